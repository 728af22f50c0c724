"""The student / teacher pair: backbone with mask token + DINO head (+ separate iBOT head), and the EMA update.

Student and teacher are two instances of ``SSLModel`` with identical parameter names (the teacher has no drop
path), so the EMA, checkpoints and FSDP sharding treat them alike. One ``forward`` serves both roles: DDP and FSDP2
only hook ``forward``, and the whole student computation must run inside it.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from pathdino.models import BackboneConfig, DINOHead, HeadConfig, MaskedViT, build_backbone
from pathdino.models.query_rows import enable_query_rows, objective_tokens


class SSLModel(nn.Module):
    """``backbone`` (``MaskedViT``), ``dino_head`` and, if separate, ``ibot_head`` (else the DINO head serves iBOT).

    ``forward(global_crops, local_crops, masks, teacher=False)`` returns logits and the backbone CLS:

    * ``global_cls_logits`` [G*B, K], ``local_cls_logits`` [L*B, K] (student only; None if no local crops),
    * ``masked_patch_logits`` [M, K_ibot] at the M patches where ``masks`` is True, in ``masks``' row-major order,
    * ``global_cls`` [G*B, D], the backbone CLS after the final norm (KoLeo / KDE and health metrics),
    * ``global_patch`` [G*B, N, D], all global-crop patch tokens, only with ``return_patches`` (else None).

    The student replaces masked patches by the mask token; the teacher (``teacher=True``) sees the crops unmasked
    and only reads its patch tokens at the masked positions.
    """

    def __init__(
        self,
        backbone_cfg: BackboneConfig,
        dino_head: HeadConfig,
        ibot_head: HeadConfig | None = None,
        *,
        trim_last_block: bool = True,
        distill_dim: int | None = None,
    ):
        super().__init__()
        self.backbone = MaskedViT(build_backbone(backbone_cfg))
        # The last block runs its queries on the tokens the objective reads only (an exact cut; query_rows.py).
        # False computes every token, as an exported encoder does (kept for tests and benchmarks).
        self.trim_last_block = trim_last_block and enable_query_rows(self.backbone.backbone.blocks[-1])
        dim = self.backbone.embed_dim
        self.dino_head = DINOHead.from_config(dim, dino_head)
        self.ibot_head = DINOHead.from_config(dim, ibot_head) if ibot_head is not None else None
        # Feature distillation from a wider/narrower encoder: the student's tokens projected to its width.
        self.distill_proj = nn.Linear(dim, distill_dim) if distill_dim and distill_dim != dim else None

    def fsdp_units(self) -> list[nn.Module]:
        """The modules FSDP2 shards one by one (each ViT block, then each head); the root is sharded last."""
        return [
            *self.backbone.backbone.blocks,
            self.dino_head,
            *([self.ibot_head] if self.ibot_head else []),
            *([self.distill_proj] if self.distill_proj is not None else []),
        ]

    def forward(
        self,
        global_crops: torch.Tensor,
        local_crops: torch.Tensor | None,
        masks: torch.Tensor,
        *,
        teacher: bool = False,
        mask_indices: torch.Tensor | None = None,
        return_patches: bool = False,
        mask_input: bool | None = None,
        embed_only: bool = False,
    ) -> dict[str, torch.Tensor | None]:
        """See the class docstring; ``mask_indices`` (``masks.flatten().nonzero()[:, 0]``, computed once per step)
        avoids a device sync per call for the boolean gather. ``return_patches`` adds ``global_patch``
        [G*B, N, D], every global-crop patch token (Gram anchoring, feature distillation; the last block then runs
        in full). ``mask_input`` (default: not ``teacher``) replaces the masked patches by the mask token.

        ``embed_only=True`` returns ``{"cls": [B, D]}`` for ``global_crops`` alone: every token through every block
        and the final norm, unmasked, no heads: what the exported timm encoder's ``model(x)`` gives (the in-training
        probe; it goes through this root ``forward`` because FSDP2 gathers the root's own parameters only here).
        """
        if embed_only:
            return {"cls": self.backbone(global_crops)["cls"]}
        if mask_indices is None:
            mask_indices = masks.flatten().nonzero().squeeze(1)
        mask_input = not teacher if mask_input is None else mask_input
        # Masks always go into the student (even with none set) so the mask token is in every step's graph, which
        # DDP needs; likewise the heads run on zero rows when no patch is masked. The teacher sees the crops unmasked.
        local_crops = None if teacher else local_crops
        global_patch = None
        if self.trim_last_block and not return_patches:
            out = objective_tokens(self.backbone, global_crops, local_crops, masks, mask_indices, mask_input=mask_input)
            g_cls, masked_patches, local_cls = out["global_cls"], out["masked_patch"], out["local_cls"]
        else:
            full = self.backbone.forward_crops(global_crops, local_crops, masks if mask_input else None)
            g_cls = full["global"]["cls"]
            global_patch = full["global"]["patch"]
            masked_patches = global_patch.flatten(0, 1).index_select(0, mask_indices)
            local_cls = None if full["local"] is None else full["local"]["cls"]
        n_global = g_cls.shape[0]
        n_local = 0 if local_cls is None else local_cls.shape[0]
        if self.ibot_head is None:
            # One pass through the shared head: its 65k-prototype layer dominates the head cost.
            tokens = [g_cls] + ([local_cls] if local_cls is not None else []) + [masked_patches]
            # split, not slicing: its backward concatenates the parts' gradients into one [rows, K] tensor, where
            # each slice's backward allocates and zero-fills its own full-size [rows, K] gradient, then the three
            # are added (at K = 65,536 each is ~370 MB in fp32).
            global_logits, local_logits, patch_logits = self.dino_head(torch.cat(tokens)).split(
                [n_global, n_local, masked_patches.shape[0]]
            )
            local_logits = local_logits if local_cls is not None else None
        else:
            cls = g_cls if local_cls is None else torch.cat([g_cls, local_cls])
            global_logits, local_logits = self.dino_head(cls).split([n_global, n_local])
            local_logits = local_logits if local_cls is not None else None
            patch_logits = self.ibot_head(masked_patches)
        return {
            "global_cls_logits": global_logits,
            "local_cls_logits": local_logits,
            "masked_patch_logits": patch_logits,
            "global_cls": g_cls,
            "global_patch": global_patch if return_patches else None,
            # feature distillation: CLS and patch tokens at the teacher's width (only with return_patches)
            "distill_cls": self._project(g_cls) if return_patches else None,
            "distill_patch": self._project(global_patch) if return_patches else None,
        }

    def _project(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.distill_proj(tokens) if self.distill_proj is not None else tokens


def build_student_teacher(
    backbone_cfg: BackboneConfig,
    dino_head: HeadConfig,
    ibot_head: HeadConfig | None,
    *,
    distill_dim: int | None = None,
) -> tuple[SSLModel, SSLModel]:
    """Student (with drop path) and teacher (without, eval mode, no grads) starting from identical weights;
    ``distill_dim``: a feature-distillation teacher's width (a projection when it differs from the student's)."""
    student = SSLModel(backbone_cfg, dino_head, ibot_head, distill_dim=distill_dim)
    teacher = SSLModel(replace(backbone_cfg, drop_path_rate=0.0), dino_head, ibot_head, distill_dim=distill_dim)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    teacher.eval()
    return student, teacher


def _local(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 parameters are DTensors; student and teacher are sharded alike, so the EMA is shard-local.
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student``, parameter by parameter (same names)."""
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        missing = sorted(set(t_params) ^ set(s_params))[:5]
        raise ValueError(f"EMA: student and teacher parameters differ (e.g. {missing})")
    names = list(t_params)
    t_list = [_local(t_params[n].data) for n in names]
    s_list = [_local(s_params[n].data).to(t_list[i].dtype) for i, n in enumerate(names)]
    torch._foreach_lerp_(t_list, s_list, 1.0 - momentum)  # one pass over the weights (mul + add took two)


@torch.no_grad()
def copy_backbone_(dst: nn.Module, src: nn.Module) -> None:
    """``dst <- src`` parameter by parameter (a Gram teacher refreshed from the EMA teacher's backbone). ``src``
    may be FSDP2-sharded (gathered here: every process calls this at the same step); ``dst`` is a plain module."""
    d_params = dict(dst.named_parameters())
    for name, param in src.named_parameters():
        value = param.full_tensor() if hasattr(param, "full_tensor") else param
        d_params[name].copy_(value)
