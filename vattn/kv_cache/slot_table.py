"""Rows of the virtual KV tensors: which sequence owns each row, and how many leading pages each row keeps mapped."""

from __future__ import annotations


class SlotTable:
    def __init__(self, num_slots: int):
        self.free: list[int] = list(range(num_slots))  # rows with no owner; their pages may stay mapped for reuse
        self.slot_of: dict[int, int] = {}  # seq_id -> row
        self.mapped = [0] * num_slots  # leading pages mapped in each row (the same in every tensor)
        self.live = [0] * num_slots  # tokens the row's owner needs mapped (0 for a free row)

    def pick(self, need_pages: int) -> int | None:
        """A free row, preferring the one that already maps enough pages with the fewest to spare, else the most."""
        if not self.free:
            return None
        return min(self.free, key=lambda s: (0, self.mapped[s]) if self.mapped[s] >= need_pages else (1, -self.mapped[s]))

    def take(self, seq_id: int, slot: int, live: int) -> None:
        self.free.remove(slot)
        self.slot_of[seq_id] = slot
        self.live[slot] = live

    def release(self, seq_id: int) -> int | None:
        slot = self.slot_of.pop(seq_id, None)
        if slot is not None:
            self.live[slot] = 0
            self.free.append(slot)
        return slot
