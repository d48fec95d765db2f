"""Economic benchmarks: what each cheat earns against honest serving, through the real control plane."""
