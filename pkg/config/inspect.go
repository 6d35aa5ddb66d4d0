package config

import (
	"fmt"
	"os"
)

// LoadForInspection reads the file at path like Load, but accepts services in
// modes lbctl cannot run yet. It is for commands that check a host against a
// config (lbctl doctor) rather than run it: the host can be prepared for a
// mode before the mode lands.
func LoadForInspection(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	return parse(path, data, knownModes)
}
