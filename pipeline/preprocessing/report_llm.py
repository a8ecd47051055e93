"""The LLM reporter: a structured report from any OpenAI-compatible chat endpoint, validated and retried.

It talks through the official ``openai`` client to ``--llm-base-url`` (OpenAI by default; vLLM, llama.cpp,
Ollama ... serve the same API under ``http://host:port/v1``). The prompt carries the organ, the lesion type, the
organ's extent, the vocabulary and the user's fixed attributes, and ends with a valid JSON skeleton. The reply is
checked field by field (:mod:`preprocessing.report_validation`); an invalid reply is sent back with the list of
problems, up to ``retries`` more times, then the case fails with the last problems as the reason.
"""
from __future__ import annotations

import json
import warnings
from typing import Any

import numpy as np

from preprocessing.report_format import ATTRIBUTE_ORDER, CT_VALUE, LOCATION, SIZE, ReportError, ReportRequest
from preprocessing.report_validation import validate_reply
from ldm.data.vocabulary import vocabulary_for_prompt

DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
NO_KEY = "no-key"
COMPLETIONS_SUFFIX = "/chat/completions"
SYSTEM_PROMPT = "You are a radiology expert who writes structured CT lesion reports. You reply with JSON only."


def normalise_base_url(base_url: str | None) -> str | None:
    """The base URL the client expects; a trailing ``/chat/completions`` is removed with a warning (the client adds it)."""
    if not base_url:
        return None
    url = base_url.strip().rstrip("/")
    if url.endswith(COMPLETIONS_SUFFIX):
        url = url[: -len(COMPLETIONS_SUFFIX)]
        warnings.warn(f"--llm-base-url {base_url!r} ends in {COMPLETIONS_SUFFIX}; using the base URL {url!r}", stacklevel=2)
    return url


def _skeleton(request: ReportRequest) -> str:
    placeholders = {
        "enhancement status": "<one phrase>,", LOCATION: str(request.organ_id), "shape": "<phrase>,",
        SIZE: "[[X Y Z]] pixel,", "density": "<one phrase>,", "density variations": "<one phrase>,",
        CT_VALUE: "Mean density of the lesion region is approximately <integer> HU,",
        "surface characteristics": "<phrase>,", "relationship with adjacent organs": "<one phrase>,",
        "specific features": "<phrase>, or empty", "cavity": "<one phrase>,",
    }
    attributes = {name: placeholders[name] for name in ATTRIBUTE_ORDER}
    report = {str(request.organ_id): ["<the shape value>", "", attributes, [[list(request.organ_extent_xyz)], [[0, 0, 0]]]]}
    return json.dumps(report)


def _bound_text(request: ReportRequest) -> str:
    if request.max_size_xyz is None:
        return ""
    return (f" and not larger than {list(request.max_size_xyz)} (X, Y, Z: the largest lesion the synthesis models "
            "can hold at this voxel size)")


def build_prompt(request: ReportRequest) -> str:
    """The user message for one case."""
    extent = list(request.organ_extent_xyz)
    spacing = ", ".join(f"{s:g}" for s in request.spacing_xyz_mm)
    fixed = {key: list(value) if key == SIZE else value for key, value in request.fixed.items()}
    lines = [
        f"Write a plausible structured CT report of a {request.lesion_type} in the {request.organ_name} "
        f"(TotalSegmentator organ id {request.organ_id}).",
        f"The {request.organ_name} spans [[{', '.join(map(str, extent))}]] voxels along X, Y, Z (voxel size {spacing} mm).",
    ]
    if request.organ_mean_hu is not None:
        lines.append(f"The mean density of the {request.organ_name} in this CT is about {request.organ_mean_hu:.0f} HU.")
    if request.contrast_enhanced is not None:
        lines.append("This CT is contrast-enhanced." if request.contrast_enhanced else "This CT is a non-contrast CT.")
    lines += [
        "Vocabulary: every attribute value below must be made of phrases from this list (each inner list holds "
        "synonyms), each phrase followed by a comma; 'specific features' may be empty:",
        json.dumps(vocabulary_for_prompt(request.hollow)),
        "Rules: 'lesion location' is the organ id; the lesion size X, Y, Z in voxels goes into the last element "
        f"[[X, Y, Z]] and into 'size' as \"[[X Y Z]] pixel,\"; each of X, Y, Z is a positive integer not larger than "
        f"the organ's extent {extent}{_bound_text(request)}; 'CT value' is the lesion's mean density as an integer number of HU; the first "
        "element repeats the 'shape' value.",
    ]
    if fixed:
        lines.append(f"Use exactly these attribute values given by the user: {json.dumps(fixed)}")
    lines += ["Reply with only this JSON object, filled in, no other text:", _skeleton(request)]
    return "\n".join(lines)


class LLMReporter:
    """Reports from an OpenAI-compatible chat endpoint (see the module docstring)."""

    name = "llm"

    def __init__(self, base_url: str | None = None, model: str = DEFAULT_MODEL, api_key: str | None = None,
                 retries: int = 2, temperature: float = 0.7, max_tokens: int = 2048, timeout_s: float = 120.0):
        from openai import OpenAI

        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.base_url = normalise_base_url(base_url)
        self.model = model
        self.retries = int(retries)
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.client = OpenAI(api_key=api_key or NO_KEY, base_url=self.base_url, timeout=timeout_s, max_retries=2)

    @property
    def settings(self) -> dict[str, Any]:
        """What identifies this reporter's output (part of a case's fingerprint)."""
        return {"reporter": self.name, "base_url": self.base_url, "model": self.model,
                "temperature": self.temperature, "max_tokens": self.max_tokens}

    def _complete(self, messages: list[dict[str, str]]) -> tuple[str, str | None]:
        import openai

        where = self.base_url or "the OpenAI API"
        try:
            response = self.client.chat.completions.create(
                model=self.model, messages=messages, temperature=self.temperature, max_tokens=self.max_tokens)
        except openai.NotFoundError as error:
            raise ReportError(f"LLM endpoint {where}: 404 ({error.message}); check --llm-base-url (a base URL "
                              f"such as http://127.0.0.1:8000/v1) and --llm-model {self.model!r}") from None
        except openai.AuthenticationError:
            raise ReportError(f"LLM endpoint {where}: the API key was refused; set it in the variable named by "
                              "--llm-api-key-env") from None
        except openai.APIConnectionError as error:
            raise ReportError(f"LLM endpoint {where}: cannot connect ({error})") from None
        except openai.APIStatusError as error:
            raise ReportError(f"LLM endpoint {where}: HTTP {error.status_code} ({error.message})") from None
        if not response.choices:
            return "", None
        choice = response.choices[0]
        return choice.message.content or "", choice.finish_reason

    def generate(self, request: ReportRequest, rng: np.random.Generator | None = None) -> dict[str, list]:
        """The validated ``type.json`` dict; ReportError after ``retries + 1`` invalid replies (``rng`` is unused)."""
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": build_prompt(request)},
        ]
        problem = ""
        for _ in range(self.retries + 1):
            reply, finish_reason = self._complete(messages)
            try:
                if finish_reason == "length":
                    raise ReportError("the reply was cut off by the token limit; reply with the JSON object only")
                return validate_reply(reply, request)
            except ReportError as error:
                problem = str(error)
            messages += [
                {"role": "assistant", "content": reply},
                {"role": "user", "content": f"Your reply is invalid: {problem}. Reply again with only the corrected JSON object."},
            ]
        raise ReportError(f"the LLM gave no valid report in {self.retries + 1} attempts; last problem: {problem}")
