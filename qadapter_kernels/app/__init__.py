"""The application on top of the library: the ``qadapter`` command line (``cli``), the end-to-end
demo (``demo``) and the generator of the shipped preference data (``make_preferences``).

Helpers shared by them live in ``common`` (and ``run_folder``/``train`` for the train command);
they are public within this package. The library never imports from here.
"""
