"""The fabric's wire contracts: NATS subjects (`subjects`), messages (`messages`) and
registry records (`registry`). Import the modules, not names, so call sites read
`subjects.node_generate(node_id)` and `messages.Tokens`."""

from tierflow.contracts import messages, registry, subjects

__all__ = ["messages", "registry", "subjects"]
