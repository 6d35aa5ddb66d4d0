package health

import "fmt"

// UnmarshalText reads a State printed by MarshalText (lbctl status reads
// the daemon's status as JSON).
func (s *State) UnmarshalText(b []byte) error {
	for _, v := range []State{StateUp, StateDown, StateProbation, StateDisabled} {
		if string(b) == v.String() {
			*s = v
			return nil
		}
	}
	return fmt.Errorf("unknown health state %q", b)
}
