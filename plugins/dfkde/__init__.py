"""DFKDE: deep CNN features, PCA and a Gaussian kernel density of normal parts."""
