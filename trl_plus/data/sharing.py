"""Prefix sharing and packing: the K sequences of an example forwarded as ONE block whose common prefix is computed
once, and (with packing) several examples' blocks in one row.

The idea is that of "Accelerating Direct Preference Optimization with Prefix Sharing" (arXiv 2410.20305, code
frankxwang/dpo-prefix-sharing), generalised to any K and to any rows, so every method gets it without a change:

- the longest common prefix of an example's rows (token ids) is found in the collated batch itself; with S = its
  length − 1, the block is ``shared[:S] | rest_1 | rest_2 | ...`` where ``rest_k = row_k[S:]``. Each rest starts with
  its own copy of the last shared token, so every position predicts exactly one next token (the rows' first
  different tokens are predicted by K copies of the same context, not by one position with K targets);
- positions restart at S in every rest (``position_ids``), and a 4-D boolean attention mask lets a token see its own
  block's shared part and the earlier tokens of its own rest only, never another rest nor another example's block;
- the mask is a dense 4-D boolean tensor for sdpa / eager attention, or, for a model loaded with
  ``model.attn_implementation: flex_attention`` (PyTorch's FlexAttention; GPUs: torch has no FlexAttention backward
  on a CPU), a block-sparse ``BlockMask`` built from the same rule (:meth:`SharedBatch.block_mask`). Flash-attention's
  varlen kernels take block-diagonal masks only, so they cannot express a rest that sees its shared prefix;
- the policy, the reference and the teacher run on the shared layout through TRL's fused LM head with
  ``shift_labels`` (each position's own target, ``-100`` where nothing is scored, so the head projects only scored
  positions); :meth:`SharedBatch.gather` puts the per-position values back into the plain ``[N, T]`` layout, so the
  loss context a method sees is the plain path's, value for value.

Exactness: a token's log-prob depends only on the tokens it attends to and on their positions, which are those of
the plain row; only the float summation order of attention differs (tested to 1e-5 in float32). A method whose rows
share nothing (a prompt per side) gets S = 0 blocks: correct, just no saving. Methods that need full logits or
hidden states keep the plain path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: Batch keys of variable-K batches (re-exported by ``trl_plus.data.collate``, which emits them): ``seq_mask``
#: ``[K, B]`` and ``sequence_slots`` ``[N]``.
SEQ_MASK, SEQUENCE_SLOTS = "seq_mask", "sequence_slots"
IGNORE = -100


#: The batch key under which the collator puts the shared layout's tensors (:meth:`SharedBatch.tensors`).
SHARED = "prefix_shared"


@dataclass
class SharedBatch:
    """A batch in the shared layout, and the map back to the plain one.

    ``input_ids``, ``position_ids``, ``shift_labels``, ``example`` (each token's block, −1 on padding) and ``segment``
    (0 on a block's shared part, k + 1 on its k-th rest): ``[R, L]``; ``index``: ``[N, T]`` positions into the
    flattened ``[R * L]`` shared values (``R * L``: a zero, for unscored places). The ``[R, 1, L, L]`` attention mask
    is built from ``example`` and ``segment`` where they are (on the accelerator: only ``[R, L]`` integers travel).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    example: torch.Tensor
    segment: torch.Tensor
    shift_labels: torch.Tensor
    index: torch.Tensor
    plain_tokens: int  # non-padding tokens of the plain rows
    shared_tokens: int  # non-padding tokens of the shared rows
    #: The masks built from ``example`` / ``segment``, once per batch: the policy, the reference and a teacher share them.
    _masks: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    TENSORS = ("input_ids", "position_ids", "example", "segment", "shift_labels", "index")

    def tensors(self) -> dict[str, torch.Tensor]:
        """The layout as a dict of tensors (a batch entry the trainer's device move carries along)."""
        return {name: getattr(self, name) for name in self.TENSORS}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> SharedBatch:
        """The layout back from :meth:`tensors` (the token counts are not carried)."""
        return cls(**{name: tensors[name] for name in cls.TENSORS}, plain_tokens=-1, shared_tokens=-1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """``[R, 1, L, L]`` bool: causal, within a block, and a rest sees the shared part and itself only (padding
        sees only padding: never a row without a visible token)."""
        if "dense" not in self._masks:
            width = self.example.size(1)
            causal = torch.ones(width, width, dtype=torch.bool, device=self.example.device).tril()
            same_example = self.example.unsqueeze(2) == self.example.unsqueeze(1)
            visible = (self.segment.unsqueeze(1) == 0) | (self.segment.unsqueeze(2) == self.segment.unsqueeze(1))
            self._masks["dense"] = (causal & same_example & visible).unsqueeze(1)
        return self._masks["dense"]

    def block_mask(self):
        """:attr:`attention_mask` as a FlexAttention ``BlockMask`` (``torch.nn.attention.flex_attention``): the same
        rule as a ``mask_mod`` over ``example`` / ``segment``, so the kernel skips the blocks where nothing is
        visible (other examples of a packed row, another rest) instead of reading an ``[R, 1, L, L]`` mask."""
        if "block" in self._masks:
            return self._masks["block"]
        from torch.nn.attention.flex_attention import create_block_mask

        example, segment = self.example, self.segment

        def visible(b, h, q, kv):
            return (kv <= q) & (example[b, q] == example[b, kv]) & (
                (segment[b, kv] == 0) | (segment[b, q] == segment[b, kv]))

        rows, width = example.shape
        self._masks["block"] = create_block_mask(visible, B=rows, H=None, Q_LEN=width, KV_LEN=width,
                                                 device=example.device)  # fmt: skip
        return self._masks["block"]

    def model_inputs(self, flex: bool = False) -> dict[str, torch.Tensor]:
        """The keyword arguments of the forward (fused LM head: ``fused_lm_head=True`` is the caller's); ``flex``: the
        mask as a :meth:`block_mask`, for a model loaded with ``attn_implementation: flex_attention``."""
        return {"input_ids": self.input_ids, "attention_mask": self.block_mask() if flex else self.attention_mask,
                "position_ids": self.position_ids, "shift_labels": self.shift_labels}  # fmt: skip


    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """``[R, L]`` per-position values of the shared rows -> ``[N, T]`` in the plain layout (zero where unscored);
        differentiable."""
        flat = torch.cat([values.reshape(-1), values.new_zeros(1)])
        return flat[self.index]


def uses_flex_attention(model) -> bool:
    """Whether ``model`` (a PEFT wrapper included) runs FlexAttention (``attn_implementation: flex_attention``)."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == "flex_attention"

def example_groups(batch: dict, num_sequences: int) -> list[list[int]]:
    """The rows of each example of a collated batch: sequence-major (``[seq0_ex1..seq0_exB, seq1_ex1..]``), or placed
    by ``sequence_slots``."""
    rows = batch["input_ids"].size(0)
    size = batch[SEQ_MASK].size(1) if SEQ_MASK in batch else rows // num_sequences
    slots = batch[SEQUENCE_SLOTS].tolist() if SEQUENCE_SLOTS in batch else list(range(rows))
    groups: list[list[int]] = [[] for _ in range(size)]
    for row, slot in enumerate(slots):
        groups[slot % size].append(row)
    return [g for g in groups if g]


def share_prefixes(batch: dict, pad_token_id: int, num_sequences: int, pack: bool = False) -> SharedBatch:
    """The shared layout of a collated batch (see the module docstring); ``pack`` puts several examples' blocks into
    one row, first-fit by decreasing length, rows no longer than the longest block (so never longer than without
    packing, and a block is never split)."""
    input_ids, attention, scored = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    plain_rows, plain_len = input_ids.shape
    lengths = attention.sum(1).tolist()
    ids = input_ids.tolist()
    score = scored.tolist()

    blocks = []  # per example: (tokens, positions, segments, labels, [(row, offsets per plain position)])
    for rows in example_groups(batch, num_sequences):
        seqs = [ids[r][: lengths[r]] for r in rows]
        shortest = min(len(s) for s in seqs)
        common = 0
        while common < shortest and all(s[common] == seqs[0][common] for s in seqs):
            common += 1
        shared = max(common - 1, 0)
        tokens = seqs[0][:shared]
        positions = list(range(shared))
        segments = [0] * shared
        # a shared position t predicts token t + 1, common to every row; scored if any row scores it
        labels = [seqs[0][t + 1] if any(score[r][t + 1] for r in rows) else IGNORE for t in range(shared)]
        places = []
        for k, (r, seq) in enumerate(zip(rows, seqs)):
            start = len(tokens)
            rest = seq[shared:]
            tokens += rest
            positions += range(shared, len(seq))
            segments += [k + 1] * len(rest)
            labels += [seq[t + 1] if score[r][t + 1] else IGNORE for t in range(shared, len(seq) - 1)] + [IGNORE]
            # plain shifted position t (token t + 1 predicted from t): shared part below S, the row's rest from S
            places.append((r, [t if t < shared else start + t - shared for t in range(len(seq) - 1)]))
        blocks.append((tokens, positions, segments, labels, places))

    order = sorted(range(len(blocks)), key=lambda i: -len(blocks[i][0]))
    capacity = max(len(b[0]) for b in blocks)
    shared_rows: list[list[int]] = []  # block indices per row
    fill: list[int] = []
    for i in order:
        size = len(blocks[i][0])
        row = next((j for j, used in enumerate(fill) if pack and used + size <= capacity), None)
        if row is None:
            shared_rows.append([]), fill.append(0)
            row = len(fill) - 1
        shared_rows[row].append(i)
        fill[row] += size

    width = max(fill)
    count = len(shared_rows)
    out_ids = torch.full((count, width), pad_token_id, dtype=input_ids.dtype)
    out_pos = torch.zeros((count, width), dtype=torch.long)
    out_labels = torch.full((count, width), IGNORE, dtype=torch.long)
    example = torch.full((count, width), -1, dtype=torch.long)
    segment = torch.zeros((count, width), dtype=torch.long)
    index = torch.full((plain_rows, plain_len - 1), count * width, dtype=torch.long)
    for j, members in enumerate(shared_rows):
        offset = 0
        for i in members:
            tokens, positions, segments, labels, places = blocks[i]
            n = len(tokens)
            out_ids[j, offset : offset + n] = torch.tensor(tokens, dtype=input_ids.dtype)
            out_pos[j, offset : offset + n] = torch.tensor(positions)
            out_labels[j, offset : offset + n] = torch.tensor(labels)
            example[j, offset : offset + n] = i
            segment[j, offset : offset + n] = torch.tensor(segments)
            for r, offsets in places:
                targets = torch.tensor(offsets, dtype=torch.long) + j * width + offset
                keep = torch.tensor(score[r][1 : len(offsets) + 1], dtype=torch.bool)
                index[r, : len(offsets)] = torch.where(keep, targets, index[r, : len(offsets)])
            offset += n
    return SharedBatch(
        input_ids=out_ids, position_ids=out_pos, example=example, segment=segment, shift_labels=out_labels,
        index=index, plain_tokens=int(sum(lengths)), shared_tokens=int(sum(fill)),
    )  # fmt: skip
