"""Package side of the Gradio apps (app/t2i, app/i2i are thin launchers over it)."""
