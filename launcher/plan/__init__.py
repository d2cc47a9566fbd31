"""The run planner: memory, micro batch, throughput, cost and communication of a variant x
ZeRO stage x cluster (`python -m launcher.plan --help`; figures and their sources:
`launcher/plan/estimate.py`)."""
