# Declarations of flightquant's compiled modules, for cimport between them (include path: ext/).
