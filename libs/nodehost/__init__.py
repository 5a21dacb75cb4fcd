"""The imperative shell around the emulator, shared by the decode-node and prefill-node
services: it feeds `tierflow.rdu.NodeEngine` requests from NATS, wakes it when its next
event is due on the wall clock, streams what it emits back to the requesters, and
heartbeats its state. The engine decides everything; this only carries it out."""
