"""Between the HTTP routes and the model services: the model chooser, each model's endpoint, its queue, its health."""
