"""The HTTP routes, one router per resource; :func:`service.api.app.create_app` includes them."""
