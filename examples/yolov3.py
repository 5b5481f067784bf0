"""YOLOv3 (Redmon & Farhadi, 2018) after eriklindernoren/PyTorch-YOLOv3.

A small Darknet-style backbone predicts at two scales (8x8 and 4x4 grids,
three anchors each). Target assignment happens on the host for every batch,
the way ``build_targets`` does it: each image has its own number of
ground-truth boxes, each box goes to the anchor whose shape matches best, and
predictions whose decoded box already overlaps a ground truth (IoU > 0.5) are
excused from the no-object loss — which needs the current predictions as
NumPy arrays, so the step runs a forward pass, assigns targets, then takes the
gradient. Every few steps the loop decodes detections and runs NumPy NMS.

    python examples/yolov3.py --steps 30 [--jit] [--seed 0]
"""
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from _common import checksum, param_change, parse_args, report

IMG, N_CLASSES, BATCH, EVAL_EVERY = 32, 3, 4, 5
ANCHORS = {8: np.array([[4, 4], [8, 6], [6, 8]], np.float32),     # grid 8x8, stride 4
           4: np.array([[12, 12], [16, 10], [10, 16]], np.float32)}  # grid 4x4, stride 8
N_OUT = 5 + N_CLASSES
DN = ("NHWC", "HWIO", "NHWC")


def init_params(key):
    keys = iter(jax.random.split(key, 8))
    he = lambda shape: jax.random.normal(next(keys), shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    return {"c1": he((3, 3, 3, 16)), "c2": he((3, 3, 16, 32)), "c3": he((3, 3, 32, 32)),
            "c4": he((3, 3, 32, 64)), "head8": he((1, 1, 32, 3 * N_OUT)) * 0.1,
            "head4": he((1, 1, 64, 3 * N_OUT)) * 0.1}


def conv_leaky(x, w, stride=1):
    return jax.nn.leaky_relu(lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=DN), 0.1)


def darknet(params, images):
    x = conv_leaky(images, params["c1"], 2)      # 16x16
    route = conv_leaky(conv_leaky(x, params["c2"], 2), params["c3"])  # 8x8
    deep = conv_leaky(route, params["c4"], 2)   # 4x4
    out = {}
    for grid, feat, head in ((8, route, params["head8"]), (4, deep, params["head4"])):
        y = lax.conv_general_dilated(feat, head, (1, 1), "SAME", dimension_numbers=DN)
        out[grid] = y.reshape(y.shape[0], grid, grid, 3, N_OUT)
    return out


# ---------------------------------------------------------------- host side (NumPy)
def iou_xywh(a, b):
    a1, a2 = a[..., :2] - a[..., 2:] / 2, a[..., :2] + a[..., 2:] / 2
    b1, b2 = b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2
    inter = np.prod(np.clip(np.minimum(a2, b2) - np.maximum(a1, b1), 0, None), -1)
    return inter / (np.prod(a[..., 2:], -1) + np.prod(b[..., 2:], -1) - inter + 1e-9)


def decode(raw, grid):
    """Raw head output -> boxes (cx, cy, w, h in pixels), objectness, class probs."""
    stride = IMG / grid
    gy, gx = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    sig = lambda z: 1 / (1 + np.exp(-z))
    cx = (sig(raw[..., 0]) + gx[None, :, :, None]) * stride
    cy = (sig(raw[..., 1]) + gy[None, :, :, None]) * stride
    wh = np.exp(np.clip(raw[..., 2:4], -4, 4)) * ANCHORS[grid]
    return np.concatenate([cx[..., None], cy[..., None], wh], -1), sig(raw[..., 4]), sig(raw[..., 5:])


def build_targets(preds, gt_boxes, gt_labels, ignore_thres=0.5):
    """Per scale: obj/noobj masks and box/class targets for a batch of images."""
    targets = {}
    for grid, raw in preds.items():
        stride = IMG / grid
        pred_boxes, _, _ = decode(raw, grid)
        obj = np.zeros(raw.shape[:4], np.float32)
        noobj = np.ones(raw.shape[:4], np.float32)
        tbox = np.zeros(raw.shape[:4] + (4,), np.float32)
        tcls = np.zeros(raw.shape[:4], np.int32)
        for b, (boxes, labels) in enumerate(zip(gt_boxes, gt_labels)):  # ragged: 1-4 boxes each
            for box, label in zip(boxes, labels):
                ious = iou_xywh(np.concatenate([[0, 0], box[2:]]), np.concatenate([np.zeros((3, 2)), ANCHORS[grid]], 1))
                a = int(ious.argmax())
                gi, gj = int(box[0] // stride), int(box[1] // stride)
                obj[b, gj, gi, a], noobj[b, gj, gi, a] = 1.0, 0.0
                noobj[b, gj, gi, ious > ignore_thres] = 0.0
                tbox[b, gj, gi, a] = [box[0] / stride - gi, box[1] / stride - gj,
                                      np.log(box[2] / ANCHORS[grid][a, 0]), np.log(box[3] / ANCHORS[grid][a, 1])]
                tcls[b, gj, gi, a] = label
            # Predictions that already overlap a ground truth are not "no object".
            overlap = iou_xywh(pred_boxes[b][..., None, :], boxes[None, None, None]).max(-1)
            noobj[b][overlap > ignore_thres] = 0.0
        targets[grid] = (obj, noobj, tbox, tcls)
    return targets


def nms(boxes, scores, iou_threshold=0.4):
    order, keep = np.argsort(-scores), []
    while order.size:
        keep.append(order[0])
        order = order[1:][iou_xywh(boxes[order[0]][None], boxes[order[1:]]) <= iou_threshold]
    return keep


def detect(params, images, conf_thres=0.2):
    preds = {g: np.asarray(p) for g, p in darknet(params, images).items()}
    detections = []
    for b in range(len(images)):
        boxes, scores = [], []
        for grid, raw in preds.items():
            bx, conf, cls = decode(raw[b:b + 1], grid)
            score = (conf[..., None] * cls).max(-1).reshape(-1)
            boxes.append(bx.reshape(-1, 4)[score > conf_thres])
            scores.append(score[score > conf_thres])
        boxes, scores = np.concatenate(boxes), np.concatenate(scores)
        detections.append(len(nms(boxes, scores)) if len(scores) else 0)
    return detections


# ---------------------------------------------------------------- training
def bce(logits, target):
    return jnp.maximum(logits, 0) - logits * target + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def yolo_loss(params, images, targets):
    total = 0.0
    for grid, raw in darknet(params, images).items():
        obj, noobj, tbox, tcls = targets[grid]
        n_obj = jnp.maximum(obj.sum(), 1.0)
        xy = jnp.sum(((jax.nn.sigmoid(raw[..., :2]) - tbox[..., :2]) ** 2).sum(-1) * obj)
        wh = jnp.sum(((raw[..., 2:4] - tbox[..., 2:]) ** 2).sum(-1) * obj)
        conf = jnp.sum(bce(raw[..., 4], 1.0) * obj) + 0.5 * jnp.sum(bce(raw[..., 4], 0.0) * noobj)
        cls = jnp.sum(bce(raw[..., 5:], jax.nn.one_hot(tcls - 1, N_CLASSES)).sum(-1) * obj)
        total = total + (xy + wh + conf + cls) / n_obj
    return total


def update(params, velocity, images, targets, lr=2e-3, momentum=0.9):
    loss, grads = jax.value_and_grad(yolo_loss)(params, images, targets)
    velocity = jax.tree_util.tree_map(lambda v, g: momentum * v + g, velocity, grads)
    params = jax.tree_util.tree_map(lambda p, v: p - lr * v, params, velocity)
    return params, velocity, loss


def train_step(params, velocity, images, gt_boxes, gt_labels, forward=darknet, update=update):
    preds = {g: np.asarray(p) for g, p in forward(params, images).items()}
    targets = build_targets(preds, gt_boxes, gt_labels)
    return update(params, velocity, images, targets)


def make_batch(rng, n):
    """1-4 squares/rectangles per image; boxes as (cx, cy, w, h), classes 1..3."""
    images = 0.2 * rng.standard_normal((n, IMG, IMG, 3)).astype(np.float32)
    boxes, labels = [], []
    for i in range(n):
        k = int(rng.integers(1, 5))
        wh = rng.uniform(4, 16, size=(k, 2))
        c = rng.uniform(wh / 2, IMG - wh / 2)
        cls = rng.integers(1, N_CLASSES + 1, size=k)
        for (cx, cy), (w, h), label in zip(c, wh, cls):
            images[i, int(cy - h / 2):int(cy + h / 2), int(cx - w / 2):int(cx + w / 2), label - 1] += 1.0
        boxes.append(np.concatenate([c, wh], 1).astype(np.float32))
        labels.append(cls)
    return images, boxes, labels


def main():
    args = parse_args(__doc__, split=True)
    rng = np.random.default_rng(args.seed)
    params = params0 = init_params(jax.random.PRNGKey(args.seed))
    velocity = jax.tree_util.tree_map(jnp.zeros_like, params)
    step_fn = jax.jit(train_step) if args.jit else train_step
    if args.jit_split:  # jit the forward and the update; targets stay on the host
        step_fn = functools.partial(train_step, forward=jax.jit(darknet), update=jax.jit(update))
    eval_images = make_batch(np.random.default_rng(1234), 4)[0]

    losses, detections, times = [], [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        images, gt_boxes, gt_labels = make_batch(rng, BATCH)
        params, velocity, loss = step_fn(params, velocity, images, gt_boxes, gt_labels)
        losses.append(float(loss))
        if (step + 1) % EVAL_EVERY == 0:
            detections += detect(params, eval_images)
            print(f"step {step + 1:3d}  loss {losses[-1]:.4f}  detections per image {detections[-4:]}")
        times.append(time.perf_counter() - t0)

    report(times, checksum(param_change(params, params0), losses, detections))


if __name__ == "__main__":
    main()
