"""The database serve.py searches while items are added and removed (README, "Search page and API").

Searches read a View, one immutable state of the database; a write builds the next state beside it,
saves it to the index file and only then puts it in place, so a search never sees half a write, a write
never waits for searches, and a write that was acknowledged is on disk: the file is replaced atomically
(a temporary file in the same folder, synced, renamed), so a crash at any moment leaves the old or the
new index, never a mix. Writes take turns.

Every item keeps its number when others are removed: the index file records the numbers (see
retrieval.ITEM_NUMBERS) once they are no longer the items' positions, and numbers are never reused.
Added images are stored in ``<index file>.images/``, named by their content.
"""
import contextlib
import dataclasses
import functools
import hashlib
import os
import threading

import torch

import collapse
import retrieval
from hamming_index import HammingIndex
from runtime import write_bytes_atomically


@dataclasses.dataclass(frozen=True)
class View:
    """One state of the database: the index, each item's number ((N,) ascending), the next number."""
    index: HammingIndex
    numbers: torch.Tensor
    next_number: int

    @classmethod
    def of(cls, index):
        numbers = retrieval.item_numbers(index)
        return cls(index, numbers, int(index.source.get(retrieval.NEXT_ITEM_NUMBER, int(numbers[-1]) + 1)))

    def position(self, number):
        """Where item ``number`` is in the index, or None when there is no such item (never or removed)."""
        where = int(torch.searchsorted(self.numbers, number))
        return where if where < len(self.numbers) and int(self.numbers[where]) == number else None

    @functools.cached_property
    def distinct_codes(self):
        return collapse.code_health(self.index.codes)["distinct_codes"]


class LiveIndex:
    """A HammingIndex that takes new items and removes items while it is searched; ``path`` is the index
    file that every write replaces (None: a database that cannot be written)."""

    def __init__(self, index, path=None):
        self.path = path
        self.images_dir = f"{os.path.abspath(path)}.images" if path else None
        self._view = View.of(index)
        self._write_turn = threading.Lock()

    @property
    def view(self):
        """The current state; it does not change under a search that holds it."""
        return self._view

    def add(self, code, image_bytes, extension, labels=None):
        """Add an image with its (1, K) code and (C,) 0/1 labels (None: unlabelled); its item number."""
        image_path = os.path.join(self.images_dir, hashlib.sha256(image_bytes).hexdigest()[:32] + extension)
        with self._write_turn:
            if not os.path.exists(image_path):
                write_bytes_atomically(image_path, image_bytes)
            view = self._view
            index = view.index
            label_rows = None
            if index.labels is not None:
                row = torch.zeros(1, index.labels.shape[1], dtype=torch.uint8) if labels is None else labels[None]
                label_rows = torch.cat([index.labels, row.to(torch.uint8)])
            number = view.next_number
            self._commit(torch.cat([index.codes, code.to(index.codes.dtype)]), index.paths + [image_path],
                         label_rows, torch.cat([view.numbers, torch.tensor([number])]), number + 1)
        return number

    def remove(self, number):
        """Remove item ``number``; False when there is no such item. Its image goes too when this index
        stored it and no other item shows it."""
        with self._write_turn:
            view = self._view
            position = view.position(number)
            if position is None:
                return False
            if len(view.numbers) == 1:
                raise ValueError("the index's last item cannot be removed: an index holds at least one item")
            keep = torch.cat([torch.arange(position), torch.arange(position + 1, len(view.numbers))])
            index = view.index
            paths = index.paths[:position] + index.paths[position + 1:] if index.paths else None
            self._commit(index.codes[keep], paths, None if index.labels is None else index.labels[keep],
                         view.numbers[keep], view.next_number)
            removed_image = index.paths[position] if index.paths else None
            if removed_image and os.path.dirname(removed_image) == self.images_dir and removed_image not in paths:
                with contextlib.suppress(FileNotFoundError):      # removed by hand: the item is gone all the same
                    os.remove(removed_image)
        return True

    def _commit(self, codes, paths, labels, numbers, next_number):
        """Save the next state, then search it."""
        source = {**self._view.index.source, retrieval.ITEM_NUMBERS: numbers,
                  retrieval.NEXT_ITEM_NUMBER: next_number}
        index = HammingIndex(codes, paths, labels, source)
        index.save(self.path)
        self._view = View(index, numbers, next_number)
