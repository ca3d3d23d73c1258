"""Modules over the PQ ops: :class:`ProductQuantizer` (drop-in PQ layer) and :class:`ExpansionHead` (EQUSS E)."""

from equss.nn.expansion import ExpansionHead
from equss.nn.quantizer import PQOutput, PQStats, ProductQuantizer

__all__ = ["ExpansionHead", "PQOutput", "PQStats", "ProductQuantizer"]
