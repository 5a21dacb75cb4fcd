"""Stop strings, applied on the node where the text is made (OpenAI's `stop`).

A stream with stop strings holds back any text that might be the start of one (a
suffix that is a proper prefix of a stop string), so text before a stop string that
spans several tokens never goes out only to be taken back. When a stop string
appears, the text is cut right before it, the request ends with finish_reason
"stop", and its usage counts the tokens generated up to and including the one that
completed the stop string (as vLLM counts them). At the normal end of the stream the
held-back text goes out with its last tokens.

A generation resumed on another node starts matching afresh from its first new token:
a stop string spanning the migration point is not seen (the one imprecision; rare).
"""

from __future__ import annotations

__all__ = ["StopMatcher"]


class StopMatcher:
    __slots__ = ("_stops", "pending")

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self.pending = ""  # text held back: it may begin a stop string

    def __bool__(self) -> bool:
        return bool(self._stops)

    def feed(self, text: str) -> tuple[str, bool]:
        """(text to send now, whether a stop string was found): with one found, the text
        is everything before it and the stream is over."""
        buf = self.pending + text
        cut = -1
        for stop in self._stops:
            at = buf.find(stop)
            if at >= 0 and (cut < 0 or at < cut):
                cut = at
        if cut >= 0:
            self.pending = ""
            return buf[:cut], True
        hold = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), hold, -1):
                if buf.endswith(stop[:k]):
                    hold = k
                    break
        if hold:
            self.pending = buf[-hold:]
            return buf[:-hold], False
        self.pending = ""
        return buf, False

    def flush(self) -> str:
        """The held-back text, at the stream's normal end."""
        text, self.pending = self.pending, ""
        return text
