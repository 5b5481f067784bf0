"""Faster R-CNN (Ren et al., 2015): two-stage detection with host-side proposals.

Backbone + region proposal network in JAX; everything between the two stages
happens in NumPy on concrete values, as in torchvision/detectron: anchor
target assignment by IoU, box decoding, top-k + non-maximum suppression of the
proposals (a different number survives for every image), ground-truth boxes
appended, and a positive/negative sample of RoIs per image. RoIAlign gathers
the features at the sampled boxes with bilinear weights computed on the host.
The RPN outputs are fetched mid-step through ``jax.vjp`` so a single backward
pass covers both stages.

    python examples/faster_rcnn.py --steps 30 [--jit] [--seed 0]
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from _common import checksum, param_change, parse_args, report

IMG, STRIDE, N_CLASSES, BATCH = 32, 4, 3, 2
FEAT = IMG // STRIDE
ANCHOR_SIZES = (8.0, 12.0, 16.0)
PRE_NMS_TOPK, POST_NMS_TOPK, RPN_BATCH, ROIS_PER_IMAGE, POOL = 32, 24, 32, 16, 3
DN = ("NHWC", "HWIO", "NHWC")


# ---------------------------------------------------------------- box utils (NumPy)
def make_anchors():
    centers = (np.arange(FEAT) + 0.5) * STRIDE
    cy, cx = np.meshgrid(centers, centers, indexing="ij")
    boxes = [np.stack([cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2], -1) for s in ANCHOR_SIZES]
    return np.stack(boxes, 2).reshape(-1, 4)  # (FEAT*FEAT*A, 4), same order as the RPN output


ANCHORS = make_anchors()


def box_iou(a, b):
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
    return inter / (area(a)[:, None] + area(b)[None] - inter + 1e-9)


def encode(gt, boxes):
    wh, gwh = boxes[:, 2:] - boxes[:, :2], gt[:, 2:] - gt[:, :2]
    ctr, gctr = boxes[:, :2] + wh / 2, gt[:, :2] + gwh / 2
    return np.concatenate([(gctr - ctr) / wh, np.log(gwh / wh)], -1).astype(np.float32)


def decode(deltas, boxes):
    wh = boxes[:, 2:] - boxes[:, :2]
    ctr = boxes[:, :2] + wh / 2 + deltas[:, :2] * wh
    wh = wh * np.exp(np.clip(deltas[:, 2:], -4, 4))
    return np.clip(np.concatenate([ctr - wh / 2, ctr + wh / 2], -1), 0, IMG)


def nms(boxes, scores, iou_threshold):
    order, keep = np.argsort(-scores), []
    while order.size:
        i = order[0]
        keep.append(i)
        order = order[1:][box_iou(boxes[i:i + 1], boxes[order[1:]])[0] <= iou_threshold]
    return np.array(keep, dtype=np.int64)


# ---------------------------------------------------------------- model (JAX)
def init_params(key):
    keys = iter(jax.random.split(key, 10))
    he = lambda shape: jax.random.normal(next(keys), shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    a = len(ANCHOR_SIZES)
    return {
        "backbone": {"c1": he((3, 3, 3, 16)), "c2": he((3, 3, 16, 32))},
        "rpn": {"conv": he((3, 3, 32, 32)), "obj": he((1, 1, 32, a)) * 0.1, "box": he((1, 1, 32, 4 * a)) * 0.1},
        "head": {"fc": he((POOL * POOL * 32, 64)), "cls": he((64, N_CLASSES + 1)) * 0.1,
                 "box": he((64, 4)) * 0.1},
    }


def backbone_rpn(p, images):
    conv = lambda x, w, s=1: lax.conv_general_dilated(x, w, (s, s), "SAME", dimension_numbers=DN)
    feat = jax.nn.relu(conv(jax.nn.relu(conv(images, p["backbone"]["c1"], 2)), p["backbone"]["c2"], 2))
    h = jax.nn.relu(conv(feat, p["rpn"]["conv"]))
    n = images.shape[0]
    return feat, conv(h, p["rpn"]["obj"]).reshape(n, -1), conv(h, p["rpn"]["box"]).reshape(n, -1, 4)


def roi_align(feat, index, weight):
    """Bilinear RoIAlign as a gather: host-computed corner indices and weights."""
    flat = feat.reshape(-1, feat.shape[-1])
    pooled = (flat[index] * weight[..., None]).sum(axis=2)  # (R, POOL*POOL, C)
    return pooled.reshape(pooled.shape[0], -1)


def smooth_l1(x):
    ax = jnp.abs(x)
    return jnp.where(ax < 1.0, 0.5 * x * x, ax - 0.5)


# ---------------------------------------------------------------- host-side stages
def rpn_targets(gt_boxes):
    """Anchor labels (1/0/-1) and regression targets, subsampled like torchvision."""
    labels = np.full((BATCH, len(ANCHORS)), -1, np.float32)
    targets = np.zeros((BATCH, len(ANCHORS), 4), np.float32)
    for b, gt in enumerate(gt_boxes):
        iou = box_iou(ANCHORS, gt)
        best = iou.argmax(1)
        labels[b, iou.max(1) < 0.3] = 0
        labels[b, iou.max(1) >= 0.5] = 1
        labels[b, iou.argmax(0)] = 1  # every GT gets its best anchor
        targets[b] = encode(gt[best], ANCHORS)
        pos, neg = np.flatnonzero(labels[b] == 1), np.flatnonzero(labels[b] == 0)
        if len(pos) > RPN_BATCH // 2:
            labels[b, np.random.choice(pos, len(pos) - RPN_BATCH // 2, replace=False)] = -1
        n_neg = RPN_BATCH - min(len(pos), RPN_BATCH // 2)
        if len(neg) > n_neg:
            labels[b, np.random.choice(neg, len(neg) - n_neg, replace=False)] = -1
    return labels, targets


def propose(objectness, deltas):
    """Decode, take the top-k, NMS: a different number of proposals per image."""
    proposals = []
    for b in range(objectness.shape[0]):
        boxes = decode(deltas[b], ANCHORS)
        top = np.argsort(-objectness[b])[:PRE_NMS_TOPK]
        boxes, scores = boxes[top], objectness[b][top]
        wide = (boxes[:, 2] - boxes[:, 0] > 1) & (boxes[:, 3] - boxes[:, 1] > 1)
        boxes, scores = boxes[wide], scores[wide]
        proposals.append(boxes[nms(boxes, scores, 0.6)[:POST_NMS_TOPK]])
    return proposals


def sample_rois(proposals, gt_boxes, gt_labels):
    rois, labels, targets = [], [], []
    for b, (props, gt, gl) in enumerate(zip(proposals, gt_boxes, gt_labels)):
        cand = np.concatenate([props, gt])
        iou = box_iou(cand, gt)
        match, best = iou.argmax(1), iou.max(1)
        pos, neg = np.flatnonzero(best >= 0.5), np.flatnonzero(best < 0.5)
        pos = np.random.choice(pos, min(len(pos), ROIS_PER_IMAGE // 4), replace=False)
        pool = neg if len(neg) else np.flatnonzero(best >= 0)
        neg = np.random.choice(pool, ROIS_PER_IMAGE - len(pos), replace=len(pool) < ROIS_PER_IMAGE - len(pos))
        keep = np.concatenate([pos, neg])
        rois.append(np.concatenate([np.full((len(keep), 1), b), cand[keep]], 1))
        labels.append(np.where(np.arange(len(keep)) < len(pos), gl[match[keep]], 0))
        targets.append(encode(gt[match[keep]], cand[keep]))
    return np.concatenate(rois), np.concatenate(labels), np.concatenate(targets)


def roi_align_indices(rois):
    """Bilinear sampling at POOLxPOOL bin centres of every RoI on the feature map."""
    b, x1, y1, x2, y2 = (rois[:, i:i + 1] for i in range(5))
    frac = (np.arange(POOL) + 0.5) / POOL
    xs = (x1 + (x2 - x1) * frac) / STRIDE - 0.5
    ys = (y1 + (y2 - y1) * frac) / STRIDE - 0.5
    ys, xs = np.repeat(ys, POOL, 1), np.tile(xs, (1, POOL))
    xs, ys = np.clip(xs, 0, FEAT - 1), np.clip(ys, 0, FEAT - 1)
    x0, y0 = np.minimum(np.floor(xs), FEAT - 2), np.minimum(np.floor(ys), FEAT - 2)
    fx, fy = xs - x0, ys - y0
    base = b * FEAT * FEAT
    index = np.stack([base + y0 * FEAT + x0, base + y0 * FEAT + x0 + 1,
                      base + (y0 + 1) * FEAT + x0, base + (y0 + 1) * FEAT + x0 + 1], -1)
    weight = np.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx], -1)
    return index.astype(np.int32), weight.astype(np.float32)


# ---------------------------------------------------------------- training
def head_loss(head, feat, obj, deltas, rpn_labels, rpn_box_targets, index, weight, roi_labels, roi_targets):
    valid, pos = rpn_labels >= 0, rpn_labels == 1
    bce = jnp.maximum(obj, 0) - obj * pos + jnp.log1p(jnp.exp(-jnp.abs(obj)))
    rpn_cls = jnp.sum(bce * valid) / valid.sum()
    rpn_box = jnp.sum(smooth_l1(deltas - rpn_box_targets).sum(-1) * pos) / valid.sum()
    h = jax.nn.relu(roi_align(feat, index, weight) @ head["fc"])
    logp = jax.nn.log_softmax(h @ head["cls"])
    roi_cls = -jnp.mean(jnp.take_along_axis(logp, roi_labels[:, None], 1))
    fg = roi_labels > 0
    roi_box = jnp.sum(smooth_l1(h @ head["box"] - roi_targets).sum(-1) * fg) / max(len(roi_labels), 1)
    return rpn_cls + rpn_box + roi_cls + roi_box


def host_targets(obj, deltas, gt_boxes, gt_labels):
    """Between the stages: concrete values on the host."""
    rpn_labels, rpn_box_targets = rpn_targets(gt_boxes)
    proposals = propose(np.asarray(obj), np.asarray(deltas))
    rois, roi_labels, roi_targets = sample_rois(proposals, gt_boxes, gt_labels)
    index, weight = roi_align_indices(rois)
    return (rpn_labels, rpn_box_targets, index, weight, roi_labels, roi_targets), [len(p) for p in proposals]


def train_step(params, images, gt_boxes, gt_labels, lr=0.01):
    trunk = {"backbone": params["backbone"], "rpn": params["rpn"]}
    (feat, obj, deltas), trunk_vjp = jax.vjp(lambda p: backbone_rpn(p, images), trunk)
    targets, kept = host_targets(obj, deltas, gt_boxes, gt_labels)
    loss, (g_head, g_feat, g_obj, g_deltas) = jax.value_and_grad(head_loss, argnums=(0, 1, 2, 3))(
        params["head"], feat, obj, deltas, *targets)
    (g_trunk,) = trunk_vjp((g_feat, g_obj, g_deltas))
    grads = {**g_trunk, "head": g_head}
    params = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)
    return params, loss, kept


@jax.jit
def sgd_update(params, images, targets, lr=0.01):
    full_loss = lambda p: head_loss(p["head"], *backbone_rpn(p, images), *targets)
    loss, grads = jax.value_and_grad(full_loss)(params)
    return jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads), loss


def train_step_split(params, images, gt_boxes, gt_labels, _rpn=jax.jit(backbone_rpn)):
    """--jit-split: jitted RPN forward, host targets, jitted full loss + update (trunk recomputed)."""
    _, obj, deltas = _rpn(params, images)
    targets, kept = host_targets(obj, deltas, gt_boxes, gt_labels)
    params, loss = sgd_update(params, images, targets)
    return params, loss, kept


def make_batch(rng, n):
    """Images with 1-3 coloured rectangles each; the colour channel is the class."""
    images = 0.2 * rng.standard_normal((n, IMG, IMG, 3)).astype(np.float32)
    boxes, labels = [], []
    for i in range(n):
        k = int(rng.integers(1, 4))
        wh = rng.uniform(6, 14, size=(k, 2))
        xy = rng.uniform(0, IMG - wh)
        bx = np.concatenate([xy, xy + wh], 1)
        cls = rng.integers(1, N_CLASSES + 1, size=k)
        for (x1, y1, x2, y2), c in zip(bx.astype(int), cls):
            images[i, y1:y2, x1:x2, c - 1] += 1.0
        boxes.append(bx.astype(np.float32))
        labels.append(cls)
    return images, boxes, labels


def detect(params, images, score_threshold=0.5):
    feat, obj, deltas = backbone_rpn(params, images)
    proposals = propose(np.asarray(obj), np.asarray(deltas))
    rois = np.concatenate([np.concatenate([np.full((len(p), 1), b), p], 1) for b, p in enumerate(proposals)])
    h = jax.nn.relu(roi_align(feat, *roi_align_indices(rois)) @ params["head"]["fc"])
    probs = np.asarray(jax.nn.softmax(h @ params["head"]["cls"]))
    counts = []
    for b in range(len(images)):
        mine = rois[:, 0] == b
        score, boxes = probs[mine, 1:].max(1), rois[mine, 1:]
        keep = nms(boxes, score, 0.5)
        counts.append(int((score[keep] > score_threshold).sum()))
    return counts


def main():
    args = parse_args(__doc__, split=True)
    rng = np.random.default_rng(args.seed)
    params = params0 = init_params(jax.random.PRNGKey(args.seed))
    step_fn = jax.jit(train_step) if args.jit else train_step_split if args.jit_split else train_step

    losses, n_proposals, times = [], [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        images, gt_boxes, gt_labels = make_batch(rng, BATCH)
        params, loss, kept = step_fn(params, images, gt_boxes, gt_labels)
        losses.append(float(loss))
        n_proposals += kept
        times.append(time.perf_counter() - t0)
        if step % 10 == 0:
            print(f"step {step:3d}  loss {losses[-1]:.4f}  proposals kept per image {kept}")

    counts = detect(params, make_batch(np.random.default_rng(1234), 4)[0])
    print(f"detections per image {counts}")
    report(times, checksum(param_change(params, params0), losses, n_proposals, counts))


if __name__ == "__main__":
    main()
