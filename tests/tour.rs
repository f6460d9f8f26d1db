//! The README's CLI tour, run as written against a real `cloud48 serve` on the default fleet:
//! every line succeeds, except those whose comment says they are refused or fail (which must
//! fail and say why), and those that follow a stream (`Ctrl-C ends it`), which must still be running, or
//! have ended well, when they are interrupted.

use std::path::Path;
use std::time::Duration;

use crate::common::{ServeProcess, binary};

/// One line of the tour: the shell text and what it must do.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Step {
    line: String,
    expect: Expect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Succeeds,
    Refused,
    Follows,
}

/// The first `sh` block after `## CLI tour`, one step per line that is not only a comment.
fn tour(readme: &str) -> Vec<Step> {
    let section = &readme[readme
        .find("## CLI tour")
        .expect("the README has a CLI tour")..];
    let start = section.find("```sh\n").expect("the tour has a sh block") + "```sh\n".len();
    let block = &section[start..start + section[start..].find("```").unwrap()];
    block
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|l| {
            let (line, comment) = match l.find("  #") {
                Some(at) => (&l[..at], l[at + 3..].trim()),
                None => (l, ""),
            };
            let expect = if comment.starts_with("refused") || comment.starts_with("fails") {
                Expect::Refused
            } else if comment.contains("Ctrl-C ends it") {
                Expect::Follows
            } else {
                Expect::Succeeds
            };
            Step {
                line: line.trim().to_string(),
                expect,
            }
        })
        .collect()
}

#[test]
fn the_tour_is_read_line_by_line_with_what_each_must_do() {
    let steps = tour(
        "x\n## CLI tour\ntext\n```sh\ncloud48 a   # it works\n# only a comment\n\
         cloud48 b  # refused: no\ncloud48 c  # follows (Ctrl-C ends it)\n```\n```sh\nnot this\n```",
    );
    let expect: Vec<_> = steps.iter().map(|s| (s.line.as_str(), s.expect)).collect();
    assert_eq!(
        expect,
        [
            ("cloud48 a", Expect::Succeeds),
            ("cloud48 b", Expect::Refused),
            ("cloud48 c", Expect::Follows)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_of_the_readme_tour_works_as_written() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let steps = tour(&readme);
    assert!(steps.len() > 30, "the tour has its lines: {steps:?}");

    // The core as the README's first command starts it: default fleet, `./cloud48-data`.
    let home = crate::common::tempdir();
    let data = home.path().join("cloud48-data");
    let mut serve = ServeProcess::spawn(
        Path::new(binary()),
        &data,
        &["--plugin-deadline-ms", "2000"],
    )
    .unwrap();
    serve.health(true).await.unwrap();

    // One shell runs the whole tour (exports carry over); each line's output and exit status
    // go to files named by its number.
    let out = home.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let mut script = String::from("set -u\n");
    for (i, s) in steps.iter().enumerate() {
        let o = out.join(i.to_string());
        let o = o.display();
        match s.expect {
            Expect::Follows => {
                std::fs::write(out.join(format!("{i}.sh")), &s.line).unwrap();
                script.push_str(&format!(
                    "timeout 3 bash {o}.sh >{o}.out 2>{o}.err </dev/null; echo $? >{o}.rc\n"
                ));
            }
            _ => script.push_str(&format!(
                "{{ {} ; }} >{o}.out 2>{o}.err </dev/null; echo $? >{o}.rc\n",
                s.line
            )),
        }
    }
    let bin = Path::new(binary()).parent().unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let run = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(home.path())
        .env("PATH", path)
        .env("CLOUD48_SERVER", &serve.url)
        .env_remove("CLOUD48_USER")
        .env_remove("CLOUD48_PASSWORD")
        .kill_on_drop(true)
        .status();
    let status = tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .expect("the tour ends within 10 minutes")
        .unwrap();
    assert!(status.success(), "the tour's shell ran to its end");

    let mut failures = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        let read = |ext: &str| std::fs::read_to_string(out.join(format!("{i}.{ext}")));
        let rc: i32 = read("rc").unwrap().trim().parse().unwrap();
        let (stdout, stderr) = (read("out").unwrap(), read("err").unwrap());
        let ok = match s.expect {
            Expect::Succeeds => rc == 0,
            // Refused with a reason on one line, not a usage error or a crash.
            Expect::Refused => {
                rc == 1 && stderr.trim().lines().count() == 1 && !stderr.contains("panicked")
            }
            // Still following when interrupted (124), or done.
            Expect::Follows => rc == 124 || rc == 0,
        };
        if !ok {
            failures.push(format!(
                "line {}: `{}` ({:?}) exited {rc}\nstdout: {stdout}\nstderr: {stderr}",
                i + 1,
                s.line,
                s.expect
            ));
        }
    }
    let _ = serve.child.kill();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
