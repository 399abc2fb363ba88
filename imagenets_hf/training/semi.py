"""Semi-supervised training as UniMatch V2 (LiheYoung/UniMatch-V2, `unimatch_v2.py`), inside `finetune`'s loop.

Per micro-batch: the teacher (an EMA of the student, eval mode, no gradient) labels the weak view of the unlabelled
images; its confident pixels (softmax maximum >= `confidence_threshold`, padding excluded) are the targets; the two
strong views are CutMix-ed with the batch flipped along dim 0 (images, pseudo-labels, confidences and padding masks
alike) and go through the student in one forward with complementary feature dropout; the loss is
`supervised_loss_weight` x the labelled loss + `unsupervised_loss_weight` x the mean of the two strong views' losses,
each normalised by the number of non-padding pixels (not by the confident ones), as UniMatch V2 does. After each
optimizer step the teacher moves towards the student with momentum min(1 - 1/(t + 1), `ema_momentum`).

`pseudo_label_classes: image_class` (not UniMatch V2's) takes the class of a pseudo-labelled object from the unlabelled
image's folder where it gives one (ImageNet-S's unlabelled images are ImageNet train images, each in its class's
folder) and only object against "other" from the teacher: the teacher's confusions between classes cannot become
targets; its errors between object and background still can.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from imagenets_hf.data.masks import OTHER_ID
from imagenets_hf.model.modeling_vit_fcn import resize_bilinear

PADDING = 255  # `ignore_mask` of the unlabelled batches: 255 where the crop is padding (no image)


def make_teacher(student: torch.nn.Module) -> torch.nn.Module:
    """A copy of the (bare) student in eval mode without gradients: the EMA teacher, checkpointed with the run."""
    teacher = copy.deepcopy(student)
    teacher.eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


def ema_ratio(iteration: int, momentum: float) -> float:
    """UniMatch V2's teacher momentum after optimizer step `iteration` (0-based): min(1 - 1/(t + 1), momentum); 0
    at the first step, so the teacher starts as a copy of the student after it."""
    return min(1 - 1 / (iteration + 1), momentum)


@torch.no_grad()
def update_teacher(teacher: torch.nn.Module, student: torch.nn.Module, iteration: int, momentum: float) -> None:
    """teacher <- ratio x teacher + (1 - ratio) x student, parameters and floating buffers (BatchNorm statistics);
    integer buffers (BatchNorm's step count) are copied, where UniMatch V2 truncates the blend into them."""
    ratio = ema_ratio(iteration, momentum)
    for param, param_ema in zip(student.parameters(), teacher.parameters(), strict=True):
        param_ema.mul_(ratio).add_(param.detach().to(param_ema.dtype), alpha=1 - ratio)
    for buffer, buffer_ema in zip(student.buffers(), teacher.buffers(), strict=True):
        if buffer_ema.is_floating_point():
            buffer_ema.mul_(ratio).add_(buffer.detach().to(buffer_ema.dtype), alpha=1 - ratio)
        else:
            buffer_ema.copy_(buffer)


def cutmix(values: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """`values` (B, ...) with the pixels inside `box` (B, H, W; 1 inside) taken from the batch flipped along dim 0
    (image i gets image B-1-i's pixels there), as unimatch_v2.py mixes images, pseudo-labels, confidences and padding
    masks; images (B, C, H, W) take the box on every channel."""
    inside = box.to(torch.bool)
    if values.dim() == 4:
        inside = inside[:, None].expand_as(values)
    return torch.where(inside, values.flip(0), values)


@dataclass
class PseudoLabels:
    """The teacher's view of an unlabelled batch, at the crops' resolution (B, H, W)."""

    labels: torch.Tensor  # long: argmax class
    confidence: torch.Tensor  # float: softmax maximum
    padding: torch.Tensor  # uint8: 255 where the crop is padding

    def mixed(self, box: torch.Tensor) -> PseudoLabels:
        return PseudoLabels(cutmix(self.labels, box), cutmix(self.confidence, box), cutmix(self.padding, box))

    def confident(self, threshold: float) -> torch.Tensor:
        """bool (B, H, W): pixels the student learns, confident and not padding."""
        return (self.confidence >= threshold) & (self.padding != PADDING)


def pseudo_label(
    teacher_logits: torch.Tensor, padding: torch.Tensor, image_class: torch.Tensor | None = None
) -> PseudoLabels:
    """Pseudo-labels from the teacher's logits (B, K, h, w), upsampled bilinearly to the crops' size first (the
    padding mask's), as the model's loss upsamples its logits: the softmax's argmax and maximum.

    With `image_class` (B,) (`pseudo_label_classes: image_class`), an image of known class c (>= 0) gets a two-way
    decision instead: "object" (the softmax mass of every class but "other", 1 - p_other) against "other"; a pixel
    is labelled c where the object's mass is larger, "other" elsewhere, with that mass as its confidence. The teacher
    says where an object is, the image's folder which class it is. Images of unknown class (-1) keep the argmax."""
    probs = resize_bilinear(teacher_logits.float(), tuple(padding.shape[-2:])).softmax(dim=1)
    confidence, labels = probs.max(dim=1)
    if image_class is not None:
        known = (image_class >= 0)[:, None, None]
        p_other = probs[:, OTHER_ID]
        is_object = p_other < 0.5
        object_labels = torch.where(is_object, image_class[:, None, None], torch.full_like(labels, OTHER_ID))
        labels = torch.where(known, object_labels, labels)
        confidence = torch.where(known, torch.maximum(p_other, 1 - p_other), confidence)
    return PseudoLabels(labels, confidence, padding)


def unsupervised_loss(model, logits: torch.Tensor, targets: PseudoLabels, threshold: float) -> torch.Tensor:
    """Cross entropy of the student's `logits` on the confident pixels of `targets`, summed and divided by the number
    of non-padding pixels (UniMatch V2's normalisation), at the resolution of the model's own loss
    (`model.loss_labels`: 1/loss_downsample of the crop, labels resized nearest)."""
    ignore = model.config.ignore_index
    labels = torch.where(targets.confident(threshold), targets.labels, torch.full_like(targets.labels, ignore))
    labels = model.loss_labels(labels)
    valid = model.loss_labels(targets.padding) != PADDING
    logits = resize_bilinear(logits.float(), tuple(labels.shape[-2:]))
    pixel_losses = F.cross_entropy(logits, labels, ignore_index=ignore, reduction="none")
    return pixel_losses.sum() / valid.sum().clamp(min=1)


@dataclass
class SemiLosses:
    """One micro-batch's losses: `loss` (what is back-propagated), the labelled `loss_x`, the unlabelled `loss_u`
    (mean of the two strong views) and the ratio of confident pixels among the non-padding ones of the weak view."""

    loss: torch.Tensor
    loss_x: torch.Tensor
    loss_u: torch.Tensor
    confident_ratio: torch.Tensor


def semi_losses(
    model: torch.nn.Module,
    teacher: torch.nn.Module,
    recipe,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    unlabelled: dict[str, torch.Tensor],
    autocast,
) -> SemiLosses:
    """UniMatch V2's losses for one labelled and one unlabelled micro-batch (tensors on the training device):
    `model` is the (possibly wrapped) student, `autocast` the context of the run's mixed precision for the teacher
    (the prepared student applies its own)."""
    from accelerate.utils import extract_model_from_parallel

    bare = extract_model_from_parallel(model, keep_torch_compile=False)
    weak = unlabelled["image_weak"]
    with torch.no_grad(), autocast():
        image_class = unlabelled["image_class"] if recipe.pseudo_label_classes == "image_class" else None
        targets = pseudo_label(teacher(pixel_values=weak).logits, unlabelled["ignore_mask"], image_class)
    box1, box2 = unlabelled["cutmix_box1"], unlabelled["cutmix_box2"]
    strong = torch.cat((cutmix(unlabelled["image_strong1"], box1), cutmix(unlabelled["image_strong2"], box2)))
    loss_x = model(pixel_values=pixel_values, labels=labels).loss
    # One forward for both strong views, so that each image pair gets complementary feature dropout.
    logits1, logits2 = model(pixel_values=strong, complementary_dropout=recipe.feature_dropout).logits.chunk(2)
    threshold = recipe.confidence_threshold
    loss_u = (
        unsupervised_loss(bare, logits1, targets.mixed(box1), threshold)
        + unsupervised_loss(bare, logits2, targets.mixed(box2), threshold)
    ) / 2
    loss = recipe.supervised_loss_weight * loss_x + recipe.unsupervised_loss_weight * loss_u
    not_padding = targets.padding != PADDING
    ratio = targets.confident(threshold).sum() / not_padding.sum().clamp(min=1)
    return SemiLosses(loss, loss_x.detach(), loss_u.detach(), ratio.detach().float())


def broadcast_teacher_buffers(teacher: torch.nn.Module) -> None:
    """Make every process's teacher hold the main process's buffers. Under DDP the students' parameters are equal,
    but on CPUs (no SyncBatchNorm) each process's BatchNorm statistics move with its own batches, so the teachers'
    would drift apart; a checkpoint keeps the main process's teacher, so they must be equal for an exact resume."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for buffer in teacher.buffers():
        dist.broadcast(buffer, src=0)
