"""Triton python-backend model ``text_tokenizer``: prompt -> the text encoder's inputs.

The first step of the ``text_encoding`` ensemble (tokenizer -> text_encoder). It uses kvt's
:class:`PromptTokenizer` (the official call: truncation to S tokens with EOS kept) on the tokenizer files
copied into its version folder, and also returns the official trimmed length L = min(n + 1, S) that the
U-Nets take as ``context_len``.
"""

from __future__ import annotations

import json
import os

import numpy as np

from kvt.contract.stages import context_length
from kvt.models.text_encoder import PromptTokenizer


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        length = int(config["parameters"]["tokens_length"]["string_value"])
        folder = os.path.join(args["model_repository"], args["model_version"], "tokenizer")
        self.tokenizer = PromptTokenizer(folder, length)

    def execute(self, requests: list) -> list:
        pb = self.pb
        responses = []
        for request in requests:
            try:
                prompts = pb.get_input_tensor_by_name(request, "PROMPT").as_numpy().reshape(-1)
                ids, masks, lengths = [], [], []
                for prompt in prompts:
                    text = prompt.decode("utf-8") if isinstance(prompt, bytes) else str(prompt)
                    tokens = self.tokenizer(text)
                    ids.append(tokens.input_ids.reshape(-1).numpy().astype(np.int32))
                    masks.append(tokens.attention_mask.reshape(-1).numpy().astype(np.int32))
                    lengths.append([float(context_length(tokens.n_tokens, tokens.tokens_length))])
                responses.append(pb.InferenceResponse(output_tensors=[
                    pb.Tensor("input_ids", np.stack(ids)), pb.Tensor("attention_mask", np.stack(masks)),
                    pb.Tensor("context_len", np.asarray(lengths, dtype=np.float32))]))
            except Exception as exc:
                responses.append(pb.InferenceResponse(error=pb.TritonError(f"tokenizer: {exc}")))
        return responses
