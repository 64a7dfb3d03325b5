"""Greedy tokens from onnxruntime-genai, run in an environment of its own (its wheel needs the CPU `onnxruntime`,
which cannot share one with `onnxruntime-gpu`): `python genai_generate.py MODEL_DIR REQUEST.json` prints
{name: tokens} for each adapter named in the request ("" runs the model's own weights), all on one loaded model.
No torch here: only onnxruntime_genai, numpy and the files lora_fx wrote."""

import json
import sys

import numpy as np
import onnxruntime_genai as og


def main(directory: str, request_path: str) -> None:
    request = json.loads(open(request_path).read())
    model = og.Model(directory)
    adapters = og.Adapters(model)
    for name, path in request["adapters"].items():
        adapters.load(path, name)
    tokens = {}
    for name in ["", *request["adapters"]]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=request["max_length"], do_sample=False)
        generator = og.Generator(model, params)
        if name:
            generator.set_active_adapter(adapters, name)
        generator.append_tokens(np.array(request["prompt"], dtype=np.int32))
        while not generator.is_done():
            generator.generate_next_token()
        tokens[name] = [int(token) for token in generator.get_sequence(0)]
    print(json.dumps(tokens))


if __name__ == "__main__":
    main(*sys.argv[1:])
