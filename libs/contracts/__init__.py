"""The fabric's wire contracts: NATS subjects (`subjects`), messages (`messages`),
registry records (`registry`) and audit records (`audit`). Import the modules, not names, so call sites read
`subjects.node_generate(node_id)` and `messages.Tokens`."""

from tierflow.contracts import audit, messages, registry, subjects

__all__ = ["audit", "messages", "registry", "subjects"]
