"""What the unit and integration tests share: builders of tiny models, adapters and policies
(``builders``), server processes (``processes``) and the fixtures that the root conftest.py
registers (``fixtures``, ``sdk_fixtures``, ``training``)."""
