"""The control plane ("center"): inventory, agents, and the migration orchestrator."""
