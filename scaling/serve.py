"""`python -m scaling.serve --artifact=DIR [--port=N]`: the HTTP server for an exported model.

The server lives in `scaling/serving/server.py`; this entry point keeps the command short.
"""

from scaling.serving.server import entry

if __name__ == "__main__":
    entry()
