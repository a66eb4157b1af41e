"""The research commands' room (horizon studies, dream-only controllers, imagination-error tools): each builds on
``fastdream.run`` and ``fastdream.agent`` and is exposed as a ``fastdream`` CLI command."""
