"""Maxwell's node: resident agents in measured sandboxes, leases served to them (batched when
they are handed several at once), each answer appraised and its evidence signed by the node.

`Node` (node.py) is the object a control plane will drive; `run_directory` (standalone.py) is
`poi node DIR`, a directory of agents and leases served without one.
"""

from .node import Node, NodeResult
from .standalone import NodeDirectory, run_directory

__all__ = ["Node", "NodeDirectory", "NodeResult", "run_directory"]
