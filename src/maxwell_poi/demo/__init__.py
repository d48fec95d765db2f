"""`poi demo`, part by part over one harness: generation (the attack catalogue against the layers),
service (the same through the control plane), gateway (the OpenAI-compatible front), exact (L3
challenges, disputes and one EZKL proof)."""
