"""A tiny REC task (one coloured rectangle on grey) scored by lmms-eval's own refcoco_bbox_rec functions."""

from lmms_eval.tasks.refcoco.utils_rec import (  # noqa: F401  (the real parser and metrics)
    refcoco_bbox_rec_acc01,
    refcoco_bbox_rec_acc03,
    refcoco_bbox_rec_acc05,
    refcoco_bbox_rec_acc07,
    refcoco_bbox_rec_acc09,
    refcoco_bbox_rec_center_acc,
    refcoco_bbox_rec_doc_to_text,
    refcoco_bbox_rec_iou,
    refcoco_bbox_rec_process_result,
)
from PIL import Image, ImageDraw


def doc_to_visual(doc):
    image = Image.new("RGB", tuple(doc["size"]), (128, 128, 128))
    x0, y0, x1, y1 = doc["box"]
    ImageDraw.Draw(image).rectangle([x0, y0, x1 - 1, y1 - 1], fill=tuple(doc["rgb"]))
    return [image]
