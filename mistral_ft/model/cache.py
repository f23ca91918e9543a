"""KV cache for generation, with Mistral's rolling buffer.

The cache is an object you pass (``past_key_values=``) or get back (``use_cache=True``); a training forward never
creates one. All layers share one slot layout, so the bookkeeping (which sequence index sits in which slot, and
whether that token was padding) lives once in the cache and each layer only stores its keys and values.

Sequence index vs. position id: a slot is identified by its *sequence index* (0, 1, 2, ... over the padded batch,
as transformers' ``cache_position``), which is what the sliding-window rule ``i - W < j <= i`` uses. Rotary
positions (``position_ids``) are separate and already baked into the cached keys.

Rolling buffer (``sliding_window = W``): a query at index i only ever needs keys i-W+1..i, so each layer keeps at
most W slots, whatever the output length. When the buffer is full and one token arrives, it overwrites the slot
holding the oldest index (i - W, the one key that just left the window). Worked example, W = 4, a 6-token prompt,
then 3 decode steps::

    prefill t0..t5   attend over the 6 new keys (window mask), keep the W newest    slots = [t2 t3 t4 t5]
    decode  t6       oldest is t2 (slot 0): overwrite it                          slots = [t6 t3 t4 t5]
                     t6 attends t3 t4 t5 t6 (slot order is irrelevant: the mask comes from slot_index)
    decode  t7       oldest is t3 (slot 1)                                        slots = [t6 t7 t4 t5]
    decode  t8       oldest is t4 (slot 2)                                        slots = [t6 t7 t8 t5]

A multi-token chunk on top of a cache concatenates (old slots, new keys), attends, and keeps the W newest.

Per-layer windows (``layer_types``, Ministral): layers with the same window share one slot layout (a
:class:`SlotGroup`), so a config with sliding and full layers has two groups: the sliding layers keep a W-slot
rolling buffer, the full layers every token. Each layer attends over its own group's keys with its own window.
"""

from __future__ import annotations

import torch


class SlotGroup:
    """The slot bookkeeping shared by every layer with the same window.

    Attributes:
        window: the rolling-buffer size, or None for an unbounded group.
        slot_index: (S,) long, the sequence index held in each slot.
        slot_valid: (B, S) bool, False where the token in that slot was padding.
    """

    def __init__(self, window: int | None):
        self.window = window
        self.slot_index: torch.Tensor | None = None
        self.slot_valid: torch.Tensor | None = None
        self.plan: tuple[str, object] | None = None
        self._oldest_slot = 0

    @property
    def num_slots(self) -> int:
        return 0 if self.slot_index is None else int(self.slot_index.numel())

    def begin(self, new_index: torch.Tensor, new_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Plan the update for the new tokens; return (key_index (S',), key_valid (B, S')) in ``update``'s order."""
        T = new_index.numel()
        if self.slot_index is None:
            self.slot_index, self.slot_valid = new_index[:0], new_valid[:, :0]
        if self.window is not None and T == 1 and self.num_slots == self.window:
            # Ring write over the oldest slot; memory stays at W slots.
            slot = self._oldest_slot
            self._oldest_slot = (slot + 1) % self.window
            self.slot_index = self.slot_index.clone()
            self.slot_index[slot] = new_index[0]
            self.slot_valid = self.slot_valid.clone()
            self.slot_valid[:, slot] = new_valid[:, 0]
            self.plan = ("ring", slot)
            return self.slot_index, self.slot_valid
        index = torch.cat([self.slot_index, new_index])
        valid = torch.cat([self.slot_valid, new_valid], dim=1)
        keep = None
        if self.window is not None and index.numel() > self.window:
            keep = torch.argsort(index)[-self.window:]  # the W newest, in increasing index order
        self.plan = ("cat", keep)
        # After a cat the slots are in increasing index order, so the oldest sits in slot 0.
        self._oldest_slot = 0
        self.slot_index = index if keep is None else index[keep]
        self.slot_valid = valid if keep is None else valid[:, keep]
        return index, valid


class MistralCache:
    """Keys/values of every layer plus the slot bookkeeping of each window group.

    Attributes:
        seen: number of tokens processed so far (the sequence index of the next token).
        layer_windows: each layer's window (None = unbounded).
        groups: window -> :class:`SlotGroup`.
        window, slot_index, slot_valid, num_slots: those of the single group when all layers share one window.
    """

    def __init__(self, num_layers: int, sliding_window: int | None = None,
                 layer_windows: list[int | None] | None = None):
        self.num_layers = num_layers
        self.layer_windows = list(layer_windows) if layer_windows is not None else [sliding_window] * num_layers
        if len(self.layer_windows) != num_layers:
            raise ValueError(f"layer_windows has {len(self.layer_windows)} entries for {num_layers} layers")
        self.groups = {w: SlotGroup(w) for w in dict.fromkeys(self.layer_windows)}
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.seen = 0

    @classmethod
    def for_config(cls, config) -> "MistralCache":
        """The cache a model with this config needs: each layer's window from ``config.layer_window``."""
        return cls(config.num_hidden_layers, layer_windows=config.layer_windows)

    def get_seq_length(self) -> int:
        return self.seen

    def __len__(self) -> int:
        return self.num_layers

    def _single(self) -> SlotGroup:
        if len(self.groups) != 1:
            raise AttributeError("this cache has one slot group per window; read cache.groups[window]")
        return next(iter(self.groups.values()))

    @property
    def window(self) -> int | None:
        return self._single().window

    @property
    def slot_index(self) -> torch.Tensor | None:
        return self._single().slot_index

    @property
    def slot_valid(self) -> torch.Tensor | None:
        return self._single().slot_valid

    @property
    def num_slots(self) -> int:
        return self._single().num_slots

    def check_bounds(self) -> None:
        """Raise if a rolling group holds more slots than its window (host metadata, no sync)."""
        for group in self.groups.values():
            if group.window is not None and group.num_slots > group.window:
                raise RuntimeError(f"rolling KV cache holds {group.num_slots} slots, "
                                   f"more than sliding_window={group.window}")

    def begin(self, new_valid: torch.Tensor) -> dict[int | None, tuple[torch.Tensor, torch.Tensor]]:
        """Plan the update for T new tokens (``new_valid``: (B, T) bool) before the layers run.

        Returns window -> (key_index (S',), key_valid (B, S')): the sequence index and validity of every key the
        new queries of that group's layers attend over, in the order in which ``update`` returns keys. No
        host-device sync: slot choice is host-side.
        """
        T = new_valid.shape[1]
        new_index = torch.arange(self.seen, self.seen + T, device=new_valid.device)
        self.seen += T
        return {w: group.begin(new_index, new_valid) for w, group in self.groups.items()}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new keys/values ((B, nkv, T, hd)); return the keys/values to attend over."""
        kind, arg = self.groups[self.layer_windows[layer_idx]].plan
        old_k, old_v = self.keys[layer_idx], self.values[layer_idx]
        if kind == "ring":
            old_k[:, :, arg] = key[:, :, 0]
            old_v[:, :, arg] = value[:, :, 0]
            return old_k, old_v
        k = key if old_k is None else torch.cat([old_k, key], dim=2)
        v = value if old_v is None else torch.cat([old_v, value], dim=2)
        if arg is None:
            self.keys[layer_idx], self.values[layer_idx] = k, v
        else:
            self.keys[layer_idx], self.values[layer_idx] = k[:, :, arg].contiguous(), v[:, :, arg].contiguous()
        return k, v

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Select/reorder batch rows (e.g. drop finished rows)."""
        for i in range(self.num_layers):
            if self.keys[i] is not None:
                self.keys[i] = self.keys[i][beam_idx]
                self.values[i] = self.values[i][beam_idx]
        for group in self.groups.values():
            if group.slot_valid is not None:
                group.slot_valid = group.slot_valid[beam_idx]
