"""Studies that combine stages (the judge zoo, ablations). Unlike flows, they may import stages."""
