"""Tokenizers and LLaVA processors built locally (no hub): a character tokenizer for tiny random models, and
the image processor + chat template shared by the embedded shapes VLM and its tests."""
from __future__ import annotations

import string

IMAGE_MEAN = [0.5, 0.5, 0.5]
IMAGE_STD = [0.5, 0.5, 0.5]

# ChatML, as SmolLM2-Instruct was trained on, without the default system prompt (shorter prompts); images are
# placed where the message lists them. Consecutive images (the frames of a clip) form one contiguous run of image
# tokens, followed by one newline, so the video methods see a single multi-frame grid (a single image: image +
# newline, as before).
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}{{ image_token }}"
    "{% if loop.nextitem is not defined or loop.nextitem['type'] != 'image' %}{{ '\\n' }}{% endif %}{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def char_tokenizer(vocab_size: int = 128, image_token_id: int = 127):
    """A character-level fast tokenizer: ids 0/1/2 = <pad>/<s>/</s>, then printable ASCII, then `<image>` at
    `image_token_id`; also knows the ChatML markers. Fits the tiny random models of `mllm_efficiency.testing`."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for c in chars:
        vocab[c] = len(vocab)
    specials = ["<|im_start|>", "<|im_end|>"]
    for s in specials:
        vocab[s] = len(vocab)
    if len(vocab) >= image_token_id or image_token_id >= vocab_size:
        raise ValueError(f"image_token_id must be in [{len(vocab)}, {vocab_size - 1}], got {image_token_id}")
    vocab["<image>"] = image_token_id
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=specials + ["<image>"])
    fast.chat_template = CHATML_TEMPLATE.replace("{{ image_token }}", "<image>")
    return fast


def image_processor(image_size: int):
    """CLIP-style preprocessing: RGB, resize to image_size x image_size, scale to [-1, 1]."""
    try:
        from transformers import CLIPImageProcessorPil as cls
    except ImportError:  # transformers before the PIL/torchvision split
        from transformers import CLIPImageProcessor as cls
    return cls(do_resize=True, size={"height": image_size, "width": image_size}, do_center_crop=False,
               do_rescale=True, do_normalize=True, image_mean=IMAGE_MEAN, image_std=IMAGE_STD,
               do_convert_rgb=True)


def llava_processor(tokenizer, image_size: int, patch_size: int, image_token: str = "<image>"):
    """A LlavaProcessor (expands each image token to (image_size / patch_size)**2 placeholders)."""
    from transformers import LlavaProcessor

    template = CHATML_TEMPLATE.replace("{{ image_token }}", image_token)
    proc = LlavaProcessor(image_processor=image_processor(image_size), tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy="default", chat_template=template,
                          image_token=image_token, num_additional_image_tokens=1)
    return proc


def tiny_llava_processor(image_size: int = 32):
    """Processor for `mllm_efficiency.testing.tiny_llava` (patch 8, image token 127)."""
    return llava_processor(char_tokenizer(), image_size=image_size, patch_size=8)


def pixel_values(images, image_size: int):
    """Same tensor the image processor gives for images already of size image_size (fast path for training)."""
    import numpy as np
    import torch

    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    if arr.shape[1:3] != (image_size, image_size):
        raise ValueError(f"images must be {image_size}x{image_size}, got {arr.shape[2]}x{arr.shape[1]}")
    x = torch.from_numpy(arr).permute(0, 3, 1, 2) / 255.0
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (x - mean) / std
