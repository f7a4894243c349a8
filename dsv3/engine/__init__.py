"""The inference engine (token ids in, token ids out): paged latent cache, absorbed MLA, continuous batching,
CUDA graphs, MTP speculative decoding. See engine.py for the overview."""

from .engine import Engine
from .request import Completion, RequestOutput, SamplingParams, TokenLogprob

__all__ = ["Engine", "SamplingParams", "RequestOutput", "TokenLogprob", "Completion"]
