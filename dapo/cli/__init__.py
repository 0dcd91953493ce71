"""The operator's floor: the ``dapo`` command (``main``), the local stack and its supervisor
(``stack``, ``local``), evaluation (``evaluate``), scoring (``score``), plots (``plots``) and
the control API's client (``client``, ``client_cli``). The only floor that names services."""
