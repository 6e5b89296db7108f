"""ASGI plumbing shared by every concept: the request pipeline and its state, route paths,
route walking, the app's state and the library's fixed routes. Private."""
