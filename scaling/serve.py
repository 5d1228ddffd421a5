"""`python -m scaling.serve`: the HTTP server for a trained model.

    --artifact=DIR   a classifier exported by --mode=export, behind /predict
                     (`scaling/serving/server.py`)
    --workdir=DIR    a language model's training or import workdir, behind the OpenAI API
                     (`scaling/serving/lm_main.py`, `scaling/serving/lm_server.py`)
    --model=DIR      a Hugging Face model directory, served as it is, behind the same API

This entry point keeps the command short and picks the server by the flag given.
"""

import sys


def entry() -> None:
    if any(arg.startswith(("--workdir", "--experiment", "--model")) for arg in sys.argv[1:]):
        from scaling.serving.lm_main import entry as serve_language_model

        serve_language_model()
    else:
        from scaling.serving.server import entry as serve_classifier

        serve_classifier()


if __name__ == "__main__":
    entry()
