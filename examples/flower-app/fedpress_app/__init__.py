"""fedpress_app: a Flower app (Message API) training the fedpress digits model with FedAvg,
its updates compressed by fedpress (``compress_mod`` on the ClientApp, ``FedPress`` on the
ServerApp)."""
