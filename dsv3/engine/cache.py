"""The paged latent cache: what absorbed MLA keeps per token, in fixed-size blocks handed out from a pool.

Notable features:
- Per layer and token only the normalised c_kv (kv_lora_rank) and the roped shared key k_pe (qk_rope_head_dim) are
  stored, side by side in one slot of kv_lora_rank + qk_rope_head_dim elements: 576 for DeepSeek-V3, 71x less than
  per-head K and V.
- Per layer a tensor [num_blocks + 1, block_size, width]; a sequence owns a list of block ids (its block table), the
  same ids in every layer, so memory follows the tokens actually held. Finished, aborted and preempted sequences
  give their blocks back to the pool.
- Block 0 is never handed out: it is the scratch block where the padding rows of a CUDA-graph batch write, so they
  cannot touch a live sequence. Live block ids run from 1 to num_blocks.
- The MTP drafter's attention gets a layer of its own (index num_hidden_layers) under the same block tables.
- One tensor per layer rather than slices of one: under torch.compile a cache write into a slice of a shared
  tensor can be functionalised into a copy of the whole tensor, while a write into a tensor of its own is done in
  place.
"""

from __future__ import annotations

import torch


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockAllocator:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks, 0, -1))  # pop() hands out the lowest id first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """n block ids, or None (and nothing taken) when fewer than n are free."""
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class LatentCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype, device: torch.device):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.kv_lora_rank = kv_lora_rank
        # Zeros, not garbage: the reference attention multiplies masked slots by 0, and 0 * NaN would be NaN.
        self.dtype, self.device = dtype, device
        self.layers = [torch.zeros(num_blocks + 1, block_size, kv_lora_rank + rope_dim, dtype=dtype, device=device)
                       for _ in range(num_layers)]
        self.allocator = BlockAllocator(num_blocks)

    def layer(self, i: int) -> torch.Tensor:
        return self.layers[i]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, width: int, dtype: torch.dtype) -> int:
        return num_layers * block_size * width * torch.empty((), dtype=dtype).element_size()

    def slot(self, blocks: list[int], position: int) -> int:
        """Index of a position's slot in a layer viewed as [(num_blocks + 1) * block_size, width]."""
        return blocks[position // self.block_size] * self.block_size + position % self.block_size

    def reserve(self, blocks: list[int], num_tokens: int) -> bool:
        """Grow `blocks` in place to hold num_tokens positions; False (nothing taken) if the pool is short."""
        need = blocks_for(num_tokens, self.block_size) - len(blocks)
        if need <= 0:
            return True
        new = self.allocator.allocate(need)
        if new is None:
            return False
        blocks.extend(new)
        return True

    def release(self, blocks: list[int]) -> None:
        self.allocator.free(blocks)
        blocks.clear()
