"""The command lines behind main.py, node.py and client.py, and the demo."""
