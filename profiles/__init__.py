"""Named presets (TOML) for `compress plan --profile NAME`."""
