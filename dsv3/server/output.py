"""One choice's output as the engine's tokens arrive: text, stop strings, tool calls, logprobs, timings.

Notable features:
- Text comes from `StreamDecoder` (never half a UTF-8 character), special tokens skipped; the stop token that ended
  a request (EOS or a stop_token_id) is counted and scored but not shown, as OpenAI does.
- Stop strings: text that could still be the start of a stop string is held back, so a stream never shows a piece of
  one; at a match the text is cut before it and the choice finishes with "stop" (the caller aborts the request).
- With tools, the released text goes through `ToolCallStreamParser` and comes out as content and tool-call deltas;
  a choice that called a tool and stopped finishes with "tool_calls".
- Every token gets its offset in the choice's text (the completions API's `text_offset`); with echo the prompt's
  tokens come first, with the logprobs the engine scored them with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..chat_format import ContentDelta, ToolCallDelta, ToolCallStreamParser
from ..engine import RequestOutput, TokenLogprob
from ..tokenizer import StreamDecoder, Tokenizer


@dataclass
class Scored:
    """One token of a choice for the logprobs field: its id, its logprob (None for the first prompt token, which
    nothing predicts), and where its text starts in the choice's text."""

    token_id: int
    logprob: TokenLogprob | None
    offset: int


@dataclass
class Delta:
    """What one or more engine outputs added to a choice."""

    text: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    scored: list[Scored] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def empty(self) -> bool:
        return not (self.text or self.tool_calls or self.scored or self.finish_reason)


def _held_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    for n in range(min(len(text), max(map(len, stops)) - 1), 0, -1):
        tail = text[-n:]
        if any(s.startswith(tail) for s in stops):
            return n
    return 0


class ChoiceText:
    def __init__(self, tokenizer: Tokenizer, *, stop: tuple[str, ...] = (), tools: bool = False,
                 echo: list[int] | None = None, logprobs: bool = False, tool_id_prefix: str | None = None):
        self.decoder = StreamDecoder(tokenizer, skip_special=True)
        self.stop = stop
        self.parser = ToolCallStreamParser(tool_id_prefix) if tools else None
        self.echo = echo
        self.logprobs = logprobs
        self.held = ""  # decoded text that may be the start of a stop string
        self.length = 0  # characters decoded so far, echo included: the next token's text offset
        self.num_tokens = 0  # generated tokens received (the stop token included)
        self.num_tool_calls = 0
        self.finish_reason: str | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, out: RequestOutput, now: float, delta: Delta) -> None:
        """Take one engine output, appending what it adds to `delta`. After a stop string has finished the choice,
        later outputs are ignored."""
        if self.finished:
            return
        if self.echo is not None:
            self._echo(out, delta)
        ids = out.new_token_ids
        if ids:
            self.first_token_time = self.first_token_time or now
            self.last_token_time = now
        # the stop token that finished the request is scored but not shown
        shown = len(ids) - 1 if out.finish_reason == "stop" else len(ids)
        for k, t in enumerate(ids):
            self.num_tokens += 1
            if self.logprobs:
                delta.scored.append(Scored(t, out.new_logprobs[k] if out.new_logprobs else None, self.length))
            if k < shown:
                piece = self.decoder.feed(t)
                self.length += len(piece)
                if self._emit(piece, delta):
                    self._close(delta, "stop")
                    return
        if out.finished:
            piece = self.decoder.finish()
            self.length += len(piece)
            reason = out.finish_reason
            if self._emit(piece, delta):
                reason = "stop"
            else:
                self._release(self.held, delta)
                self.held = ""
            self._close(delta, reason)

    def _echo(self, out: RequestOutput, delta: Delta) -> None:
        scores = out.prompt_logprobs or [None] * len(self.echo)
        for t, lp in zip(self.echo, scores):
            if self.logprobs:
                delta.scored.append(Scored(t, lp, self.length))
            piece = self.decoder.feed(t)
            self.length += len(piece)
            delta.text += piece  # the prompt is shown as is: no stop strings, no tool calls
        self.echo = None

    def _emit(self, piece: str, delta: Delta) -> bool:
        """Pass new text through the stop strings; True when one matched (the text before it is released)."""
        if not self.stop:
            self._release(piece, delta)
            return False
        text = self.held + piece
        hits = [i for s in self.stop if (i := text.find(s)) != -1]
        if hits:
            self.held = ""
            self._release(text[:min(hits)], delta)
            return True
        keep = _held_len(text, self.stop)
        self.held = text[len(text) - keep:]
        self._release(text[:len(text) - keep], delta)
        return False

    def _release(self, text: str, delta: Delta) -> None:
        if self.parser is None:
            delta.text += text
        elif text:
            self._parsed(self.parser.feed(text), delta)

    def _parsed(self, events: list[ContentDelta | ToolCallDelta], delta: Delta) -> None:
        for e in events:
            if isinstance(e, ContentDelta):
                delta.text += e.text
            else:
                delta.tool_calls.append(e)
                if e.name is not None:
                    self.num_tool_calls += 1

    def _close(self, delta: Delta, reason: str | None) -> None:
        if self.parser is not None:
            self._parsed(self.parser.finish(), delta)
        if reason == "stop" and self.num_tool_calls:
            reason = "tool_calls"
        self.finish_reason = delta.finish_reason = reason
