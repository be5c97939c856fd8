"""User-facing programs: tuning tool, launcher, benchmarks, emulated cluster."""
