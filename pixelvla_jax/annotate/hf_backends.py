"""Default backends on Hugging Face `transformers` (the `annotate` extra), loaded from local
paths only (`from_pretrained(path, local_files_only=True)`): nothing is downloaded.

transformers 5.x's image processors for these models need torchvision, which does not load
next to a CPU torch on some machines, so the documented preprocessing is done here with
PIL + numpy: values from the model folder's `preprocessor_config.json` when present, else
the processors' documented defaults.

  SAM 2 video : resize to image_size x image_size (bilinear), /255, ImageNet mean/std;
                points scaled to that size; low-res masks upsampled to the frame, > 0.
  Grounding DINO: shortest edge 800, longest <= 1333 (bilinear), /255, ImageNet mean/std;
                text lower-cased and ended with "."; score = max sigmoid over text tokens;
                boxes (cx, cy, w, h) normalised -> pixels.
  SAM         : longest side 1024 (bilinear), /255, ImageNet mean/std, zero pad to
                1024 x 1024 bottom-right; boxes scaled by the resize factor; masks upsampled
                to the padded size, cropped, resized to the image, > 0.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image

from pixelvla_jax import torch_imports
from pixelvla_jax.annotate.backends import Backends, Detection, FrameRef, RuleNounExtractor
from pixelvla_jax.annotate.config import GripperPrompt

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def import_transformers():
    """The `transformers` module (offline), or an ImportError naming the `annotate` extra."""
    return torch_imports.import_transformers("annotate")


def import_torch():
    """The `torch` module, or an ImportError naming the `annotate` extra."""
    return torch_imports.import_torch("annotate")


def _preprocessor(path: str) -> dict:
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        p = os.path.join(path, name)
        if os.path.exists(p):
            with open(p) as f:
                return json.load(f)
    return {}


def _check_dir(path: str, role: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{role} model folder {path} does not exist; pass the local folder of a "
            "transformers checkpoint (config.json + weights); nothing is downloaded"
        )
    return path


def _normalize(image: np.ndarray, mean, std) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, H, W]."""
    x = image.astype(np.float32) / 255.0
    return ((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).transpose(2, 0, 1)


def _resize(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    h, w = hw
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def _upsample(torch, logits, hw):
    return torch.nn.functional.interpolate(logits, size=hw, mode="bilinear", align_corners=False)


class HFVideoSegmenter:
    """SAM 2 video (`Sam2VideoModel`): one object prompted on frame 0, propagated forward."""

    def __init__(self, path: str, device: str = "cpu", mask_threshold: float = 0.0, model=None):
        tr = import_transformers()
        self.torch = import_torch()
        self.mask_threshold = mask_threshold
        if model is None:  # `model`: an already built Sam2VideoModel (benchmarks)
            model = tr.Sam2VideoModel.from_pretrained(
                _check_dir(path, "video segmenter"), local_files_only=True
            )
        self.model = model.eval()
        self.model.to(device)
        self.device = device
        cfg = _preprocessor(path)
        size = cfg.get("size", {})
        self.size = int(size.get("height", self.model.config.image_size))
        self.mean = cfg.get("image_mean", IMAGENET_MEAN)
        self.std = cfg.get("image_std", IMAGENET_STD)
        self.name = f"sam2-video:{os.path.abspath(path)}:{mask_threshold}"
        self.session_cls = tr.Sam2VideoInferenceSession

    def segment_video(self, frames, prompt: GripperPrompt, refs: Sequence[FrameRef]):
        torch = self.torch
        t, h, w = frames.shape[:3]
        s = self.size
        video = np.stack([_normalize(_resize(f, (s, s)), self.mean, self.std) for f in frames])
        session = self.session_cls(
            video=torch.from_numpy(video),
            video_height=h,
            video_width=w,
            inference_device=self.device,
            dtype=torch.float32,
        )
        coords = [[x * s, y * s] for x, y in prompt.points]
        labels = list(prompt.labels)
        if prompt.box is not None:  # SAM 2 puts the box first as two corner points
            x0, y0, x1, y1 = prompt.box
            coords = [[x0 * s, y0 * s], [x1 * s, y1 * s], *coords]
            labels = [2, 3, *labels]
        obj = session.obj_id_to_idx(1)
        session.add_point_inputs(
            obj,
            0,
            {
                "point_coords": torch.tensor([[coords]], dtype=torch.float32),
                "point_labels": torch.tensor([[labels]], dtype=torch.int32),
            },
        )
        session.obj_with_new_inputs = [1]
        masks, scores = np.zeros((t, h, w), bool), np.zeros(t, np.float32)
        with torch.no_grad():
            self.model(session, frame_idx=0)
            for out in self.model.propagate_in_video_iterator(session, start_frame_idx=0):
                logits = _upsample(torch, out.pred_masks[:1].float(), (h, w))
                masks[out.frame_idx] = (logits[0, 0] > self.mask_threshold).cpu().numpy()
                scores[out.frame_idx] = float(torch.sigmoid(out.object_score_logits.reshape(-1)[0]))
        return masks, scores


class HFDetector:
    """Grounding DINO (`GroundingDinoForObjectDetection`) with its tokenizer."""

    def __init__(self, path: str, device: str = "cpu", max_detections: int = 10, model=None):
        tr = import_transformers()
        self.torch = import_torch()
        path = _check_dir(path, "detector")
        if model is None:
            model = tr.GroundingDinoForObjectDetection.from_pretrained(path, local_files_only=True)
        self.model = model.eval()
        self.model.to(device)
        self.tokenizer = tr.AutoTokenizer.from_pretrained(path, local_files_only=True)
        cfg = _preprocessor(path)
        size = cfg.get("size", {})
        self.shortest = int(size.get("shortest_edge", 800))
        self.longest = int(size.get("longest_edge", 1333))
        self.mean = cfg.get("image_mean", IMAGENET_MEAN)
        self.std = cfg.get("image_std", IMAGENET_STD)
        self.device, self.max_detections = device, max_detections
        self.name = f"grounding-dino:{os.path.abspath(path)}"

    def _target_size(self, h: int, w: int) -> tuple[int, int]:
        short, long = min(h, w), max(h, w)
        scale = self.shortest / short
        if long * scale > self.longest:
            scale = self.longest / long
        return max(1, round(h * scale)), max(1, round(w * scale))

    def detect(self, image, text: str, ref: FrameRef) -> list[Detection]:
        torch = self.torch
        h, w = image.shape[:2]
        pixels = _normalize(_resize(image, self._target_size(h, w)), self.mean, self.std)
        query = text.strip().lower()
        query = query if query.endswith(".") else query + "."
        tokens = self.tokenizer([query], return_tensors="pt")
        with torch.no_grad():
            out = self.model(
                pixel_values=torch.from_numpy(pixels)[None].to(self.device),
                pixel_mask=torch.ones((1, *pixels.shape[1:]), dtype=torch.long),
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device),
                token_type_ids=tokens.get(
                    "token_type_ids", torch.zeros_like(tokens["input_ids"])
                ).to(self.device),
            )
        n_text = tokens["input_ids"].shape[1]
        scores = torch.sigmoid(out.logits[0, :, :n_text]).max(-1).values.cpu().numpy()
        boxes = out.pred_boxes[0].cpu().numpy()
        order = np.argsort(-scores)[: self.max_detections]
        dets = []
        for i in order:
            cx, cy, bw, bh = boxes[i]
            x0, x1 = np.clip([(cx - bw / 2) * w, (cx + bw / 2) * w], 0, w)
            y0, y1 = np.clip([(cy - bh / 2) * h, (cy + bh / 2) * h], 0, h)
            if x1 > x0 and y1 > y0:
                dets.append(
                    Detection((float(x0), float(y0), float(x1), float(y1)), float(scores[i]), text)
                )
        return dets


class HFSegmenter:
    """SAM (`SamModel`) prompted with one box; multimask output, scores = predicted IoU."""

    def __init__(self, path: str, device: str = "cpu", mask_threshold: float = 0.0, model=None):
        tr = import_transformers()
        self.torch = import_torch()
        self.mask_threshold = mask_threshold
        if model is None:
            model = tr.SamModel.from_pretrained(
                _check_dir(path, "segmenter"), local_files_only=True
            )
        self.model = model.eval()
        self.model.to(device)
        cfg = _preprocessor(path)
        size = cfg.get("size", {})
        self.longest = int(size.get("longest_edge", self.model.config.vision_config.image_size))
        self.pad = int(cfg.get("pad_size", {}).get("height", self.longest))
        self.mean = cfg.get("image_mean", IMAGENET_MEAN)
        self.std = cfg.get("image_std", IMAGENET_STD)
        self.device = device
        self.name = f"sam:{os.path.abspath(path)}:{mask_threshold}"

    def segment(self, image, box, ref: FrameRef):
        torch = self.torch
        h, w = image.shape[:2]
        scale = self.longest / max(h, w)
        rh, rw = int(h * scale + 0.5), int(w * scale + 0.5)
        pixels = np.zeros((3, self.pad, self.pad), np.float32)
        pixels[:, :rh, :rw] = _normalize(_resize(image, (rh, rw)), self.mean, self.std)
        x0, y0, x1, y1 = box
        boxes = torch.tensor(
            [[[x0 * rw / w, y0 * rh / h, x1 * rw / w, y1 * rh / h]]], dtype=torch.float32
        )
        with torch.no_grad():
            out = self.model(
                pixel_values=torch.from_numpy(pixels)[None].to(self.device),
                input_boxes=boxes.to(self.device),
                multimask_output=True,
            )
        logits = out.pred_masks[0, 0].float()  # [K, h', w']
        logits = _upsample(torch, logits[None], (self.pad, self.pad))[..., :rh, :rw]
        logits = _upsample(torch, logits, (h, w))[0]
        return (logits > self.mask_threshold).cpu().numpy(), out.iou_scores[
            0, 0
        ].float().cpu().numpy()


FEW_SHOT = (
    "Name the first object the robot grasps.\n"
    "Instruction: pick up the red cup and put it in the sink\nObject: red cup\n"
    "Instruction: open the top drawer of the cabinet\nObject: top drawer handle\n"
    "Instruction: move the banana near the pan\nObject: banana\n"
    "Instruction: put the black bowl on the plate\nObject: black bowl\n"
    "Instruction: {instruction}\nObject:"
)


class HFNounExtractor:
    """Any causal LM with a few-shot prompt (greedy, a few tokens); the answer's first line.

    With `require_in_instruction`, an answer whose words are not all in the instruction
    (a hallucination) falls back to the rule-based extractor.
    """

    def __init__(
        self,
        path: str,
        device: str = "cpu",
        max_new_tokens: int = 8,
        prompt: str = FEW_SHOT,
        require_in_instruction: bool = True,
        model=None,
    ):
        tr = import_transformers()
        self.torch = import_torch()
        path = _check_dir(path, "noun LLM")
        if model is None:
            model = tr.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        self.model = model.eval()
        self.model.to(device)
        self.tokenizer = tr.AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.device, self.max_new_tokens, self.prompt = device, max_new_tokens, prompt
        self.require_in_instruction = require_in_instruction
        self.rules = RuleNounExtractor()
        self.name = f"llm:{os.path.abspath(path)}:{max_new_tokens}:{require_in_instruction}"

    def generate(self, instruction: str) -> str:
        torch = self.torch
        text = self.prompt.format(instruction=instruction.strip().lower())
        tokens = self.tokenizer(text, return_tensors="pt").to(self.device)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        with torch.no_grad():
            out = self.model.generate(
                **tokens, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad
            )
        answer = self.tokenizer.decode(
            out[0, tokens["input_ids"].shape[1] :], skip_special_tokens=True
        )
        return answer.strip().split("\n")[0].strip(" .,;:\"'").lower()

    def extract(self, instruction: str) -> str:
        answer = self.generate(instruction)
        words = re.findall(r"[a-z0-9'-]+", answer)
        known = set(re.findall(r"[a-z0-9'-]+", instruction.lower()))
        if not words or (self.require_in_instruction and not set(words) <= known):
            return self.rules.extract(instruction)
        return " ".join(words)


def build_backends(
    paths: dict[str, str], device: str = "cpu", video_mask_threshold: float = 0.0
) -> Backends:
    """Backends from model folders {video_segmenter, detector, segmenter, llm (optional)}."""
    return Backends(
        video_segmenter=HFVideoSegmenter(paths["video_segmenter"], device, video_mask_threshold),
        detector=HFDetector(paths["detector"], device),
        segmenter=HFSegmenter(paths["segmenter"], device),
        nouns=HFNounExtractor(paths["llm"], device) if paths.get("llm") else RuleNounExtractor(),
    )
