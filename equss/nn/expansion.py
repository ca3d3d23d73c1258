"""``ExpansionHead``: the EQUSS expansion head E (spec §3), STEGO's linear + non-linear projection going up.

``z = Conv1x1(C→D)(f) + Conv1x1(C_h→D)(ReLU(Conv1x1(C→C_h)(f)))`` with ``C_h = C`` (the authors' choice),
applied after channel dropout (``Dropout2d``, p = 0.1, active in training only) of the backbone features.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["ExpansionHead"]


class ExpansionHead(nn.Module):
    """Linear branch plus non-linear branch, summed, on ``[B, C, H, W]`` feature maps.

    The EQUSS model feeds the *dropped-out* features to the STEGO loss as well, so the dropout is exposed
    separately: ``forward(f) == project(dropout(f))``; a caller that needs the dropped features does
    ``f_d = head.dropout(f); z = head.project(f_d)``. The authors apply the same module to both views,
    each call drawing its own channel mask.

    Args:
        in_dim: ``C``, backbone feature channels (384 for ViT-S, 768 for ViT-B).
        out_dim: ``D``, the expanded dimension (1024 in the shipped configs, 2048 also studied).
        hidden_dim: width of the non-linear branch (default ``in_dim``, as the authors).
        dropout: ``Dropout2d`` probability on the input features (0.1; 0 disables it).

    Shapes: ``f [B, C, H, W]`` → ``z [B, D, H, W]``. PyTorch's default initialisation.
    """

    def __init__(
        self, in_dim: int, out_dim: int, hidden_dim: int | None = None, dropout: float = 0.1
    ) -> None:
        super().__init__()
        hidden_dim = in_dim if hidden_dim is None else hidden_dim
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ExpansionHead: {name} must be a positive int, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"ExpansionHead: dropout must be in [0, 1), got {dropout}")
        self.in_dim, self.out_dim, self.hidden_dim = in_dim, out_dim, hidden_dim
        self.dropout = nn.Dropout2d(p=dropout)
        self.linear = nn.Conv2d(in_dim, out_dim, kernel_size=1)
        self.nonlinear = nn.Sequential(
            nn.Conv2d(in_dim, hidden_dim, kernel_size=1),
            nn.ReLU(),
            nn.Conv2d(hidden_dim, out_dim, kernel_size=1),
        )

    def project(self, f: Tensor) -> Tensor:
        """Both branches, summed, without dropout: ``[B, C, H, W]`` → ``[B, D, H, W]``."""
        if f.dim() != 4 or f.shape[1] != self.in_dim:
            raise ValueError(
                f"ExpansionHead: expected features [B, {self.in_dim}, H, W], got shape {tuple(f.shape)}"
            )
        return self.linear(f) + self.nonlinear(f)

    def forward(self, f: Tensor) -> Tensor:
        """``project(dropout(f))``; the dropout only acts in training mode."""
        if f.dim() != 4 or f.shape[1] != self.in_dim:
            raise ValueError(
                f"ExpansionHead: expected features [B, {self.in_dim}, H, W], got shape {tuple(f.shape)}"
            )
        return self.project(self.dropout(f))
