"""Code that runs *inside* sandbox containers (stdlib only, the image's Python 3.11)."""
