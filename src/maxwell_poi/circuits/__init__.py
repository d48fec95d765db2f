"""L3-zk circuits: a registered block as an EZKL circuit with its weights fixed in it, and the child
process that runs each heavy EZKL step under a memory cap. Shared by the prover and the verifier."""
