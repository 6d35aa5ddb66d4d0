package health

import (
	"encoding/json"
	"testing"
)

func TestStateJSONRoundTrip(t *testing.T) {
	for _, s := range []State{StateUp, StateDown, StateProbation, StateDisabled} {
		b, err := json.Marshal(s)
		if err != nil {
			t.Fatal(err)
		}
		var got State
		if err := json.Unmarshal(b, &got); err != nil || got != s {
			t.Errorf("%s: round trip gave %s, %v", s, got, err)
		}
	}
	var s State
	if err := json.Unmarshal([]byte(`"sideways"`), &s); err == nil {
		t.Errorf("unknown state accepted")
	}
}
