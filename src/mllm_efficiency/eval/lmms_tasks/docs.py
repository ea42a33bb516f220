"""Document builders: for each lmms-eval task, `n` documents in the columns and types of the real dataset (the
hub parquet its YAML names), generated from (task, seed, index) alone.

Each builder returns a `Built`: the rows (dicts; images as PIL images), the `datasets.Features` of the real
dataset, and extra tables the task joins in (GQA's images). Questions are answerable from the image: scenes of
coloured shapes (the shapes benchmark, which shapes-vlm was trained on) or text drawn with PIL (OCR-type tasks).
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
from pathlib import Path
from typing import Callable

from .. import synthetic
from . import render

COLOURS = list(synthetic.COLOURS)
SHAPES = list(synthetic.SHAPES)
WORDS = ["apple", "river", "coffee", "garden", "market", "planet", "silver", "window", "pizza", "rocket", "forest",
         "museum", "bakery", "harbor", "tiger", "violin", "summer", "castle", "bridge", "candle"]
NAMES = ["Alice Brown", "Carlos Diaz", "Mei Chen", "Tom Walker", "Sara Lind", "Omar Haddad", "Nina Rossi"]
COMPANIES = ["ACME Corp", "Blue Lake Inc", "Nordwind Ltd", "Sunrise Foods", "Vertex Labs", "Orion Media"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October"]


@dataclasses.dataclass
class Built:
    rows: list[dict]
    features: object  # datasets.Features
    tables: dict = dataclasses.field(default_factory=dict)  # name -> (rows, features): joined tables


def rng_for(task: str, seed: int, index: int) -> random.Random:
    digest = hashlib.sha256(f"lmms_tasks|{task}|{seed}|{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def _features(spec: dict):
    from datasets import Features, Image, Value

    try:
        from datasets import List  # datasets >= 4: a list of any feature (Sequence of a dict is a dict of lists)
    except ImportError:
        from datasets import Sequence as List

    def one(t):
        if isinstance(t, dict):
            return {k: one(v) for k, v in t.items()}
        if isinstance(t, list):
            return List(one(t[0]))
        if t == "image":
            return Image()
        return Value(t)

    return Features({k: one(v) for k, v in spec.items()})


def _scene_question(rng: random.Random, shapes) -> tuple[str, str, str]:
    """(question, one-word answer, kind) about a scene, from the shapes benchmark's question kinds."""
    kind = rng.choice(["colour", "count", "exist"])
    q, a = synthetic._question(rng, kind, list(shapes))  # noqa: SLF001
    return q, a, kind


def _exist_pair(rng: random.Random, shapes) -> tuple[tuple[str, str], tuple[str, str]]:
    """One present and one absent (colour, shape) of a scene."""
    present = sorted({(s.colour, s.shape) for s in shapes})
    absent = sorted({(c, s) for c in COLOURS for s in SHAPES} - set(present))
    return rng.choice(present), rng.choice(absent)


# --------------------------------------------------------------------------------------------------- OCR tasks
def textvqa(n: int, seed: int, media: Path) -> Built:
    rows = []
    for i in range(n):
        rng = rng_for("textvqa", seed, i)
        word, colour = rng.choice(WORDS), rng.choice(COLOURS)
        shapes = [s for s in render.random_scene(rng, 1, 3) if s.row > 0]
        kind = rng.choice(["word", "colour"])
        if kind == "word":
            question, answer = rng.choice(["what is written on the sign?", "what word is on the sign?"]), word
        else:
            question, answer = "what color is the sign?", colour
        answers = [answer] * 8 + [answer.upper(), f"{answer}."]
        rng.shuffle(answers)
        rows.append(dict(image_id=f"{seed:02d}{i:06x}", question_id=34602 + i, question=question,
                         question_tokens=question.rstrip("?").split(), image=render.sign(word, colour, shapes),
                         image_width=336, image_height=336, flickr_original_url="", flickr_300k_url="",
                         answers=answers, image_classes=["Sign", "Poster"], set_name="val", ocr_tokens=[word]))
    return Built(rows, _features(dict(image_id="string", question_id="int64", question="string",
                                      question_tokens=["string"], image="image", image_width="int64",
                                      image_height="int64", flickr_original_url="string", flickr_300k_url="string",
                                      answers=["string"], image_classes=["string"], set_name="string",
                                      ocr_tokens=["string"])))


def docvqa(n: int, seed: int, media: Path) -> Built:
    rows = []
    for i in range(n):
        rng = rng_for("docvqa", seed, i)
        name, company = rng.choice(NAMES), rng.choice(COMPANIES)
        date = f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1980, 2005)}"
        total = f"${rng.randint(10, 999)}.{rng.randint(0, 99):02d}"
        ref = f"{rng.choice('ABCDEFGH')}{rng.randint(1000, 9999)}"
        fields = [("To", name), ("From", company), ("Date", date), ("Reference", ref), ("Total", total)]
        key, value = rng.choice(fields)
        question = {"To": "To whom is the memo addressed?", "From": "Which company is the memo from?",
                    "Date": "What is the date of the memo?", "Reference": "What is the reference number?",
                    "Total": "What is the total amount?"}[key]
        answers = [value] + ([value.lstrip("$")] if key == "Total" else [])
        rows.append(dict(questionId=str(50000 + seed * 10000 + i), question=question,
                         question_types=["form"], image=render.document("MEMORANDUM", fields), docId=1000 + i,
                         ucsf_document_id=f"synthetic{seed:02d}{i:05d}", ucsf_document_page_no="1",
                         answers=answers, data_split="val"))
    return Built(rows, _features(dict(questionId="string", question="string", question_types=["string"],
                                      image="image", docId="int64", ucsf_document_id="string",
                                      ucsf_document_page_no="string", answers=["string"], data_split="string")))


def chartqa(n: int, seed: int, media: Path) -> Built:
    rows = []
    for i in range(n):
        rng = rng_for("chartqa", seed, i)
        labels = rng.sample(rng.choice([["2019", "2020", "2021", "2022", "2023"],
                                        ["Asia", "Europe", "Africa", "Oceania", "America"]]), 4)
        values = rng.sample(range(5, 95), 4)
        title = rng.choice(["Sales by year", "Visitors (thousands)", "Share of users (%)", "Exports"])
        kind = rng.choice(["value", "max", "diff"])
        if kind == "value":
            j = rng.randrange(4)
            question, answer = f"What is the value of {labels[j]}?", str(values[j])
        elif kind == "max":
            question, answer = "Which category has the highest value?", labels[values.index(max(values))]
        else:
            question, answer = "What is the difference between the highest and the lowest value?", \
                str(max(values) - min(values))
        rows.append(dict(type="human_test" if i % 2 == 0 else "augmented_test", question=question, answer=answer,
                         image=render.bar_chart(title, labels, values, rng.choice(COLOURS))))
    return Built(rows, _features(dict(type="string", question="string", answer="string", image="image")))


# OCRBench question types with a dataset each (the real benchmark's sources)
OCRBENCH_TYPES = [("Regular Text Recognition", "IIIT5K"), ("Irregular Text Recognition", "CT80"),
                  ("Artistic Text Recognition", "WordArt"), ("Handwriting Recognition", "IAM"),
                  ("Digit String Recognition", "ORAND"), ("Non-Semantic Text Recognition", "NonSemanticText"),
                  ("Scene Text-centric VQA", "STVQA"), ("Doc-oriented VQA", "docVQA"),
                  ("Key Information Extraction", "SROIE"),
                  ("Handwritten Mathematical Expression Recognition", "HME100k")]


def ocrbench(n: int, seed: int, media: Path) -> Built:
    rows = []
    for i in range(n):
        rng = rng_for("ocrbench", seed, i)
        qtype, dataset = OCRBENCH_TYPES[i % len(OCRBENCH_TYPES)]
        word = rng.choice(WORDS)
        question = "what is written in the image?"
        if qtype == "Digit String Recognition":
            word = str(rng.randint(10000, 999999))
            image = render.text_image(word, fsize=40)
        elif qtype == "Non-Semantic Text Recognition":
            word = "".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(6))
            image = render.text_image(word, fsize=40)
        elif qtype == "Irregular Text Recognition":
            image = render.text_image(word, fsize=40, rotate=rng.choice([-15, -10, 10, 15]))
        elif qtype == "Artistic Text Recognition":
            image = render.text_image(word.upper(), fsize=44, bg=synthetic.COLOURS[rng.choice(COLOURS)])
            word = word.upper()
        elif qtype == "Scene Text-centric VQA":
            image = render.sign(word, rng.choice(COLOURS), ())
            question = "What word is written on the sign?"
        elif qtype == "Doc-oriented VQA":
            name = rng.choice(NAMES)
            image = render.document("INVOICE", [("Customer", name), ("Item", word)])
            question, word = "Who is the customer?", name
        elif qtype == "Key Information Extraction":
            company = rng.choice(COMPANIES)
            image = render.document("RECEIPT", [("Company", company), ("Total", f"{rng.randint(5, 99)}.00")])
            question, word = "What is the company name in the receipt?", company
        elif qtype == "Handwritten Mathematical Expression Recognition":
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            word = f"{a} + {b} = {a + b}"
            image = render.text_image(word, fsize=40)
            question = "Please write out the expression of the formula in the image using LaTeX format."
        else:
            image = render.text_image(word, fsize=40)
        rows.append(dict(dataset=dataset, question=question, question_type=qtype, answer=[word], image=image))
    return Built(rows, _features(dict(dataset="string", question="string", question_type="string",
                                      answer=["string"], image="image")))


# ------------------------------------------------------------------------------------- perception / reasoning
def ai2d(n: int, seed: int, media: Path) -> Built:
    rows = []
    for i in range(n):
        rng = rng_for("ai2d", seed, i)
        shapes = synthetic._unique(render.random_scene(rng, 2, 4))  # noqa: SLF001
        while len(shapes) < 2:
            shapes = synthetic._unique(render.random_scene(rng, 2, 4))  # noqa: SLF001
        labels = rng.sample("ABCDEFGHJK", len(shapes))
        target = rng.randrange(len(shapes))
        s = shapes[target]
        if rng.random() < 0.5:
            question = f"Which label marks the {s.colour} {s.shape}?"
            options = [labels[target]] + rng.sample([x for x in "ABCDEFGHJK" if x != labels[target]], 3)
        else:
            question = f"What color is the shape labelled {labels[target]}?"
            options = [s.colour] + rng.sample([c for c in COLOURS if c != s.colour], 3)
        correct = options[0]
        rng.shuffle(options)
        rows.append(dict(question=question, options=options, answer=str(options.index(correct)),
                         image=render.labelled_diagram(shapes, labels)))
    return Built(rows, _features(dict(question="string", options=["string"], answer="string", image="image")))


def gqa(n: int, seed: int, media: Path) -> Built:
    """Two questions per image; the images are a separate table (the hub's testdev_balanced_images) joined by
    `imageId`, as lmms-eval's gqa_process_docs does."""
    rows, images = [], []
    for i in range(n):
        rng = rng_for("gqa", seed, i // 2)
        shapes = render.random_scene(rng, 1, synthetic.MAX_OBJECTS)
        image_id = f"n{seed}{i // 2:06d}"
        if i % 2 == 0:
            images.append(dict(id=image_id, image=render.scene(shapes)))
        rng = rng_for("gqa-q", seed, i)
        question, answer, kind = _scene_question(rng, shapes)
        rows.append(dict(id=f"{seed}{i:07d}", imageId=image_id, question=question, answer=answer,
                         fullAnswer=f"The answer is {answer}.", isBalanced=True,
                         groups={"global": kind, "local": f"{kind}-{answer}"}, entailed="", equivalent="",
                         types={"structural": "query" if kind != "exist" else "verify", "semantic": "attr",
                                "detailed": kind},
                         annotations={"answer": "", "question": "", "fullAnswer": ""},
                         semantic=[{"operation": "select", "argument": kind, "dependencies": []}],
                         semanticStr=f"select: {kind}"))
    features = _features(dict(id="string", imageId="string", question="string", answer="string",
                              fullAnswer="string", isBalanced="bool", groups={"global": "string", "local": "string"},
                              entailed="string", equivalent="string",
                              types={"structural": "string", "semantic": "string", "detailed": "string"},
                              annotations={"answer": "string", "question": "string", "fullAnswer": "string"},
                              semantic=[{"operation": "string", "argument": "string", "dependencies": ["int32"]}],
                              semanticStr="string"))
    return Built(rows, features, {"images": (images, _features(dict(id="string", image="image")))})


MME_PERCEPTION = ["existence", "count", "position", "color", "OCR"]
MME_COGNITION = ["numerical_calculation", "code_reasoning"]


def mme(n: int, seed: int, media: Path) -> Built:
    """Pairs of questions on one image (one "Yes", one "No"), adjacent, as MME's pairwise score needs."""
    rows = []
    categories = MME_PERCEPTION + MME_COGNITION
    suffix = " Please answer yes or no."
    for k in range((n + 1) // 2):
        rng = rng_for("mme", seed, k)
        category = categories[k % len(categories)]
        shapes = render.random_scene(rng, 2, synthetic.MAX_OBJECTS)
        image = render.scene(shapes)
        if category == "existence":
            (c1, s1), (c2, s2) = _exist_pair(rng, shapes)
            pair = (f"Is there a {c1} {s1} in this image?", f"Is there a {c2} {s2} in this image?")
        elif category == "count":
            c = rng.choice(COLOURS)
            count = sum(s.colour == c for s in shapes)
            pair = (f"Are there {count} {c} shapes in the image?", f"Are there {count + 1} {c} shapes in the image?")
        elif category == "position":
            s = rng.choice(shapes)
            right, wrong = ("left", "right") if s.col == 0 else (("right", "left") if s.col == 2 else
                                                                  ("center", "left"))
            pair = (f"Is the {s.colour} {s.shape} on the {right} of the image?",
                    f"Is the {s.colour} {s.shape} on the {wrong} of the image?")
        elif category == "color":
            s = rng.choice(shapes)
            other = rng.choice([c for c in COLOURS if c != s.colour])
            pair = (f"Is the {s.shape} {synthetic._cell_name(s.row, s.col)} {s.colour}?",  # noqa: SLF001
                    f"Is the {s.shape} {synthetic._cell_name(s.row, s.col)} {other}?")  # noqa: SLF001
        elif category == "OCR":
            word, other = rng.sample(WORDS, 2)
            image = render.text_image(word, size=(336, 336), fsize=44)
            pair = (f'Is the word in the image "{word}"?', f'Is the word in the image "{other}"?')
        elif category == "numerical_calculation":
            a, b = rng.randint(2, 20), rng.randint(2, 20)
            image = render.text_image([f"{a} + {b} = ?"], size=(336, 336), fsize=44)
            pair = (f"Is the answer to the arithmetic question in the image {a + b}?",
                    f"Is the answer to the arithmetic question in the image {a + b + rng.randint(1, 5)}?")
        else:
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            image = render.text_image(["x = %d" % a, "y = %d" % b, "print(x * y)"], size=(336, 336), fsize=32)
            pair = (f"The output of the code in the image is {a * b}, right?",
                    f"The output of the code in the image is {a * b + 1}, right?")
        qid = f"{category}/{seed:02d}{k:04d}.png"
        for question, answer in zip(pair, ("Yes", "No")):
            rows.append(dict(question_id=qid, image=image, question=question + suffix, answer=answer,
                             category=category))
    return Built(rows[:n], _features(dict(question_id="string", image="image", question="string",
                                          answer="string", category="string")))


POPE_CATEGORIES = ["adversarial", "popular", "random"]


def pope(n: int, seed: int, media: Path) -> Built:
    rows = []
    for i in range(n):
        rng = rng_for("pope", seed, i)
        shapes = render.random_scene(rng, 1, synthetic.MAX_OBJECTS)
        (c1, s1), (c2, s2) = _exist_pair(rng, shapes)
        yes = i % 2 == 0
        colour, shape = (c1, s1) if yes else (c2, s2)
        rows.append(dict(id=str(i), question_id=str(i + 1), question=f"Is there a {colour} {shape} in the image?",
                         answer="yes" if yes else "no", image_source=f"synthetic_{seed}_{i:06d}",
                         image=render.scene(shapes), category=POPE_CATEGORIES[(i // 2) % 3]))
    return Built(rows, _features(dict(id="string", question_id="string", question="string", answer="string",
                                      image_source="string", image="image", category="string")))


def scienceqa_img(n: int, seed: int, media: Path) -> Built:
    rows = []
    for i in range(n):
        rng = rng_for("scienceqa_img", seed, i)
        shapes = render.random_scene(rng, 1, synthetic.MAX_OBJECTS)
        s = rng.choice(shapes)
        if rng.random() < 0.5:
            question = f"What color is the {s.shape} {synthetic._cell_name(s.row, s.col)}?"  # noqa: SLF001
            choices = [s.colour] + rng.sample([c for c in COLOURS if c != s.colour], rng.randint(1, 3))
            correct = s.colour
        else:
            question = f"Which shape is {synthetic._cell_name(s.row, s.col)}?"  # noqa: SLF001
            choices = list(SHAPES)
            correct = s.shape
        rng.shuffle(choices)
        hint = rng.choice(["", "Look at the picture of the shapes.", "The picture shows shapes on a grid."])
        rows.append(dict(image=render.scene(shapes), question=question, choices=choices,
                         answer=choices.index(correct), hint=hint, task="closed choice", grade="grade2",
                         subject="natural science", topic="shapes", category="Identify shapes and colors",
                         skill="Identify shapes", lecture="", solution=f"The answer is {correct}."))
    return Built(rows, _features(dict(image="image", question="string", choices=["string"], answer="int8",
                                      hint="string", task="string", grade="string", subject="string",
                                      topic="string", category="string", skill="string", lecture="string",
                                      solution="string")))


MMBENCH_CATEGORIES = [("object_localization", "Fine-grained Perception (instance-level)"),
                      ("attribute_recognition", "Fine-grained Perception (instance-level)"),
                      ("spatial_relationship", "Relation Reasoning")]


def mmbench_en_dev(n: int, seed: int, media: Path) -> Built:
    """Yes/no and two-way questions (options A, B; C and D empty, as in MMBench's two-option questions): a
    prediction naming an option's text is matched by MMBench's own rules, so no GPT judge is needed offline."""
    rows = []
    for i in range(n):
        rng = rng_for("mmbench", seed, i)
        shapes = render.random_scene(rng, 2, synthetic.MAX_OBJECTS)
        category, l2 = MMBENCH_CATEGORIES[i % len(MMBENCH_CATEGORIES)]
        qa = synthetic._question(rng, "relpos", shapes) if category == "spatial_relationship" else None  # noqa: SLF001
        q, a = qa if qa is not None else synthetic._question(rng, "exist", shapes)  # noqa: SLF001
        options = ["yes", "no"]
        hint = None if i % 3 else "Answer about the picture."
        rows.append(dict(index=i, question=q, hint=hint, A=options[0], B=options[1], C=None, D=None,
                         answer="AB"[options.index(a)], category=category, image=render.scene(shapes),
                         source="synthetic", **{"L2-category": l2}, comment=None, split="dev"))
    return Built(rows, _features({"index": "int64", "question": "string", "hint": "string", "A": "string",
                                  "B": "string", "C": "string", "D": "string", "answer": "string",
                                  "category": "string", "image": "image", "source": "string",
                                  "L2-category": "string", "comment": "string", "split": "string"}))


def realworldqa(n: int, seed: int, media: Path) -> Built:
    letter_prompt = "Please answer directly with only the letter of the correct option and nothing else."
    rows = []
    for i in range(n):
        rng = rng_for("realworldqa", seed, i)
        shapes = render.random_scene(rng, 1, synthetic.MAX_OBJECTS)
        if i % 2 == 0:
            s = rng.choice(shapes)
            options = [s.colour] + rng.sample([c for c in COLOURS if c != s.colour], 2)
            rng.shuffle(options)
            opts = "\n".join(f"{x}. {o}" for x, o in zip("ABC", options))
            question = f"What color is the {s.shape} {synthetic._cell_name(s.row, s.col)}?\n{opts}\n{letter_prompt}"  # noqa: SLF001
            answer = "ABC"[options.index(s.colour)]
        else:
            c = rng.choice(COLOURS)
            question = (f"How many {c} shapes are there? Please answer directly with a single word or number.")
            answer = str(sum(s.colour == c for s in shapes))
        rows.append(dict(image=render.scene(shapes, 448), question=question, answer=answer))
    return Built(rows, _features(dict(image="image", question="string", answer="string")))


MMMU_SUBJECTS = ["Math", "Physics", "Art", "Accounting", "Geography", "Computer_Science"]


def mmmu_val(n: int, seed: int, media: Path) -> Built:
    rows = []
    for i in range(n):
        rng = rng_for("mmmu", seed, i)
        subject = MMMU_SUBJECTS[i % len(MMMU_SUBJECTS)]
        a = render.random_scene(rng, 1, synthetic.MAX_OBJECTS)
        images = {f"image_{k}": None for k in range(1, 8)}
        images["image_1"] = render.scene(a)
        kind = i % 3
        if kind == 0:  # one image, multiple choice
            c = rng.choice(COLOURS)
            count = sum(s.colour == c for s in a)
            options = [str(count)] + [str(x) for x in rng.sample([x for x in range(6) if x != count], 3)]
            correct = options[0]
            rng.shuffle(options)
            question, qtype, answer = f"<image 1> How many {c} shapes are in the figure?", "multiple-choice", \
                "ABCD"[options.index(correct)]
        elif kind == 1:  # two images, multiple choice
            b = render.random_scene(rng, 1, synthetic.MAX_OBJECTS)
            images["image_2"] = render.scene(b)
            (c1, s1), _ = _exist_pair(rng, a)
            in_b = any((s.colour, s.shape) == (c1, s1) for s in b)
            options = ["Only <image 1>", "Only <image 2>", "Both images", "Neither image"]
            question = f"Which of the images <image 1> and <image 2> contain a {c1} {s1}?"
            qtype, answer = "multiple-choice", "C" if in_b else "A"
        else:  # open question, the answer drawn in the image
            x, y = rng.randint(2, 30), rng.randint(2, 30)
            images["image_1"] = render.text_image([f"x = {x}", f"y = {y}"], size=(336, 336), fsize=40)
            options = []
            question, qtype, answer = "<image 1> What is x + y?", "open", str(x + y)
        rows.append(dict(id=f"validation_{subject}_{i + 1}", question=question, options=repr(options),
                         explanation="", **images, img_type="['Diagrams']", answer=answer,
                         topic_difficulty=rng.choice(["Easy", "Medium", "Hard"]), question_type=qtype,
                         subfield=subject.replace("_", " ")))
    spec = dict(id="string", question="string", options="string", explanation="string")
    spec.update({f"image_{k}": "image" for k in range(1, 8)})
    spec.update(img_type="string", answer="string", topic_difficulty="string", question_type="string",
                subfield="string")
    return Built(rows, _features(spec))


VIDEOMME_DOMAINS = [("Knowledge", "Geography"), ("Life Record", "Daily Life"), ("Sports Competition", "Athletics")]
DIRECTIONS = synthetic.VIDEO_DIRECTIONS


def videomme(n: int, seed: int, media: Path) -> Built:
    """Short clips (mp4 files under `media`/videomme/data, where lmms-eval's videomme_doc_to_visual looks:
    $HF_HOME/videomme/data/<videoID>.mp4) of one shape moving; "which way does it move" with options A-D."""
    rows = []
    for i in range(n):
        sample = synthetic.make_video_sample(i, seed, frames=8, qtype="motion")
        video_id = f"mllmeff{seed:02d}v{i:04d}"
        path = media / "videomme" / "data" / f"{video_id}.mp4"
        if not path.is_file():
            render.write_video(synthetic.render_frames(sample, image_size=96), path)
        mover = sample.shapes[0]
        domain, sub = VIDEOMME_DOMAINS[i % len(VIDEOMME_DOMAINS)]
        options = [f"{x}. {d.capitalize()}." for x, d in zip("ABCD", DIRECTIONS)]
        rows.append(dict(video_id=f"{i + 1:03d}", duration="short", domain=domain, sub_category=sub,
                         url=f"file://{video_id}", videoID=video_id, question_id=f"{i + 1:03d}-1",
                         task_type="Temporal Perception",
                         question=f"Which way does the {mover.colour} {mover.shape} move in the video?",
                         options=options, answer="ABCD"[DIRECTIONS.index(sample.answer)]))
    return Built(rows, _features(dict(video_id="string", duration="string", domain="string", sub_category="string",
                                      url="string", videoID="string", question_id="string", task_type="string",
                                      question="string", options=["string"], answer="string")))


BUILDERS: dict[str, Callable[[int, int, Path], Built]] = {
    "textvqa_val": textvqa, "docvqa_val": docvqa, "chartqa": chartqa, "ocrbench": ocrbench, "ai2d": ai2d,
    "gqa": gqa, "mme": mme, "pope": pope, "scienceqa_img": scienceqa_img, "mmbench_en_dev": mmbench_en_dev,
    "realworldqa": realworldqa, "mmmu_val": mmmu_val, "videomme": videomme,
}
