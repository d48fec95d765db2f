"""The prompts and texts Maxwell's own honest runs use (profiles, demo, benchmarks): one list, so
a profile is measured on the same kind of input the demo and the benchmarks appraise."""

PROMPTS = [
    "The history of the steam engine begins with",
    "In a quiet village by the sea, the old lighthouse keeper",
    "Proof of inference lets a hypervisor check that an agent",
    "Once upon a time, in a kingdom far away, there lived",
]
TEXTS = ["Maxwell verifies inference.", "A GPU hypervisor meters energy per lease."]
