//! A model fetched by the node itself: the queen resolves the model's `source` to a URL, asks
//! the node's hive to download it (`HiveClient::pull`), and follows the signed stream of its
//! progress to the end, on a bar (a terminal only) and to the caller.

use futures::StreamExt;

use crate::config::{Model, Node};
use crate::deadline::Budget;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::protocol::ErrorBody;
use crate::protocol::pull::{PullProgress, PullRequest, Pulled};
use crate::protocol::sse::{StreamError, events};
use crate::queen::node::NodeConn;

/// What a pull tells while it runs, for a caller that reports it (`--json`).
pub(crate) enum Update<'a> {
    Progress(&'a PullProgress),
    /// A `waiting` or `retrying` event: its name and why.
    Note(&'a str, &'a str),
}

/// The URL the node would download `model` from; a configuration error naming both ways when
/// its `source` is not one.
pub(crate) fn url_of(node: &Node, model: &Model) -> Result<String> {
    model.download_url().ok_or_else(|| {
        Error::config(format!(
            "model `{}` has no URL `source` for `{}` to download it from; set `source` to an \
             http(s):// or hf://OWNER/REPO/FILE.gguf URL, or copy the file with `rbee models push \
             --node {} {}`",
            model.name, node.name, node.name, model.name
        ))
    })
}

/// Has the node's hive (running, with the node's models) download `model`; returns once the
/// file is in place and verified, or the hive refused it.
pub(crate) async fn pull(
    conn: &mut NodeConn,
    models: &crate::protocol::ModelTable,
    model: &Model,
    budget: &Budget,
    progress: &Progress,
    report: impl FnMut(Update<'_>),
) -> Result<Pulled> {
    url_of(&conn.node, model)?;
    crate::queen::lifecycle::ensure_running(conn, models, budget, progress).await?;
    download(conn, models, model, budget, progress, report).await
}

/// Has the node's hive, which runs, download `model` (as `pull`).
pub(crate) async fn download(
    conn: &NodeConn,
    models: &crate::protocol::ModelTable,
    model: &Model,
    budget: &Budget,
    progress: &Progress,
    mut report: impl FnMut(Update<'_>),
) -> Result<Pulled> {
    let url = url_of(&conn.node, model)?;
    let request = PullRequest {
        model_digest: crate::protocol::model_digest(model),
        url,
        hf_token: model.origin().is_some_and(|o| o.is_hugging_face()),
    };
    let client = &conn.client;
    let response = client
        .with_models(models, budget, || client.pull(&model.name, &request))
        .await?;
    let bar = progress.bytes(&format!("{} on {}", model.name, conn.node.name), 0);
    let mut stream = std::pin::pin!(events(response));
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(event) => event,
            Err(StreamError::Malformed(e)) => return Err(e),
            Err(StreamError::Broke(why)) => {
                return Err(Error::hive(format!(
                    "the connection to the hive on `{}` broke during the download of `{}`: \
                     {why}; pull again to resume it",
                    conn.node.name, model.name
                )));
            }
        };
        match event.event.as_str() {
            "progress" => {
                let p: PullProgress = parse(&event.data)?;
                if let Some(total) = p.total {
                    bar.set_length(total);
                }
                bar.set_position(p.bytes);
                report(Update::Progress(&p));
            }
            "waiting" | "retrying" => {
                let why = serde_json::from_str::<serde_json::Value>(&event.data)
                    .ok()
                    .and_then(|v| v.get("reason")?.as_str().map(str::to_string))
                    .unwrap_or_default();
                progress.suspend(|| report(Update::Note(&event.event, &why)));
            }
            "done" => {
                bar.finish_and_clear();
                return parse(&event.data);
            }
            "error" => {
                bar.finish_and_clear();
                let body: ErrorBody = parse(&event.data)?;
                return Err(body.into());
            }
            _ => {}
        }
    }
    Err(Error::hive(format!(
        "the hive on `{}` ended the download of `{}` without saying how it went; pull again",
        conn.node.name, model.name
    )))
}

fn parse<T: serde::de::DeserializeOwned>(data: &str) -> Result<T> {
    serde_json::from_str(data)
        .map_err(|e| Error::hive(format!("the hive sent an unreadable download event: {e}")))
}
