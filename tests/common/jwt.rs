//! Tokens minted by PyJWT, an implementation outrider did not write
//! (`tests/jwt/mint.py`), with the Python in `OUTRIDER_PYTHON`
//! (`ci/test.sh` makes a venv with PyJWT and cryptography).

use std::path::Path;

use serde_json::Value;

/// Keys and tokens from PyJWT.
pub struct Minted {
    pub jwks: String,
    pub every_key: String,
    pub tokens: serde_json::Map<String, Value>,
}

impl Minted {
    pub fn token(&self, name: &str) -> &str {
        self.tokens[name].as_str().unwrap()
    }
}

pub fn mint(request: Value) -> Minted {
    let python = std::env::var("OUTRIDER_PYTHON")
        .expect("OUTRIDER_PYTHON: a Python with PyJWT and cryptography (ci/test.sh makes one)");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/jwt/mint.py");
    let mut child = std::process::Command::new(python)
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "mint.py failed");
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    Minted {
        jwks: answer["jwks"].to_string(),
        every_key: answer["every_key"].to_string(),
        tokens: answer["tokens"].as_object().unwrap().clone(),
    }
}
