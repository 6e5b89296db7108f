"""The FastAPI glue on top of the concepts: ``install()``, the public middlewares, the route
dependencies of guarded calls and mounted sub-apps. Its public names are at the top level."""
